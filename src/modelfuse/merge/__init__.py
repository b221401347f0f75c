"""Weight-space merging: the per-tensor engine and its methods.

Each method is a pure function of the tensors of one name (see
:mod:`modelfuse.merge.registry`); :func:`merge` streams checkpoints on disk
through one of them, :func:`merge_state_dicts` does the same in memory, and
:func:`merge_multistage` runs a file of several merges where later ones use
earlier ones' outputs.

The package itself is callable: ``modelfuse.merge(config, out)`` is
``modelfuse.merge.merge(config, out)``.
"""

import sys
import types
from typing import Any

from modelfuse.merge.engine import MergeResult, merge, plan_merge
from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from modelfuse.merge.methods.dare import dare_linear, dare_ties
from modelfuse.merge.methods.fisher import fisher
from modelfuse.merge.methods.gradient_matching import gradient_matching
from modelfuse.merge.methods.linear import linear
from modelfuse.merge.methods.model_stock import model_stock
from modelfuse.merge.methods.multislerp import multislerp
from modelfuse.merge.methods.regmean import RegMeanJitterWarning, regmean
from modelfuse.merge.methods.slerp import slerp
from modelfuse.merge.methods.task_arithmetic import task_arithmetic
from modelfuse.merge.methods.task_vectors import generalized_task_arithmetic
from modelfuse.merge.methods.ties import ties
from modelfuse.merge.multistage import (
    MultistageResult,
    PlannedStage,
    merge_multistage,
    plan_multistage,
)
from modelfuse.merge.registry import METHODS, get_method
from modelfuse.merge.state_dict import merge_state_dicts

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeResult",
    "MultistageResult",
    "PlannedStage",
    "RegMeanJitterWarning",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "fisher",
    "generalized_task_arithmetic",
    "get_method",
    "gradient_matching",
    "linear",
    "merge",
    "merge_multistage",
    "merge_state_dicts",
    "model_stock",
    "multislerp",
    "plan_merge",
    "plan_multistage",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> MergeResult:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
