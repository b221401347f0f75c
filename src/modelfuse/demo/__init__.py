"""``modelfuse demo``: an end-to-end fusion study on real data that ships with scikit-learn.

:func:`run_demo` trains a small model zoo on the 1,797 handwritten digits of
``sklearn.datasets.load_digits`` (nothing is downloaded), fuses it with every
family modelfuse offers (soups, Fisher, RegMean, task arithmetic, TIES, DARE,
Model Stock, WiSE-FT, DaWin, AdaMerging, gradient matching, soft voting,
Caruana selection, temperature scaling), compares everything with the best
individual model on a held-out test split and on a shifted copy of it (tilted
digits; bootstrap intervals, Holm-adjusted paired bootstrap tests with
Holm-consistent intervals, inference cost), optionally over several seeds
(:mod:`~modelfuse.demo.seeds`), runs a
federated scenario (the digits over 10 Dirichlet non-IID clients; FedAvg,
FedAvgM, FedAU, TIES and Fisher aggregation in Flower's simulation engine;
local, global or between per client) and writes ``report.md`` and a
self-contained ``report.html``.

Modules: :mod:`~modelfuse.demo.data` (splits and tasks),
:mod:`~modelfuse.demo.zoo` (models and checkpoints),
:mod:`~modelfuse.demo.soup` and :mod:`~modelfuse.demo.multitask` (the
fusions), :mod:`~modelfuse.demo.evaluate` (the test-split comparison),
:mod:`~modelfuse.demo.partition`, :mod:`~modelfuse.demo.federated` and
:mod:`~modelfuse.demo.flower_run` (the federated scenario),
:mod:`~modelfuse.demo.report` and :mod:`~modelfuse.demo.federated_report`
(the report), :mod:`~modelfuse.demo.run`.
"""

from modelfuse.demo.run import DemoResult, run_demo
from modelfuse.demo.settings import FULL, QUICK, DemoSettings

__all__ = ["FULL", "QUICK", "DemoResult", "DemoSettings", "run_demo"]
