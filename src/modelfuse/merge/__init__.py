"""Weight-space merging: the per-tensor engine and its methods.

Each method is a pure function of the tensors of one name (see
:mod:`modelfuse.merge.registry`); :func:`merge` streams checkpoints on disk
through one of them, :func:`merge_state_dicts` does the same in memory.
"""

from modelfuse.merge.linear import linear
from modelfuse.merge.registry import METHODS, MergeMethod, get_method
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.merge.task_arithmetic import task_arithmetic

__all__ = [
    "METHODS",
    "MergeMethod",
    "get_method",
    "linear",
    "merge_state_dicts",
    "task_arithmetic",
]
