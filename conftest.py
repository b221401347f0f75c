"""Run every code block of README.md, CONTRIBUTING.md and docs/*.md as a test (Sybil).

How each block runs: tests/docs/doc_blocks.py. Collected when those files are
among pytest's paths, e.g. ``pytest README.md CONTRIBUTING.md docs``.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests" / "docs"))

from doc_blocks import documentation_sybil  # noqa: E402

pytest_collect_file = documentation_sybil(
    ROOT, ["README.md", "CONTRIBUTING.md", "docs/*.md"]
).pytest()

# modelfuse.federated.strategy imports Flower, an optional dependency (the federated extra):
# its doctests are collected where Flower is installed.
if importlib.util.find_spec("flwr") is None:
    collect_ignore = ["src/modelfuse/federated/strategy.py"]
