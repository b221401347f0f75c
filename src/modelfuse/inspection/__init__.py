"""Which merge method, when: measure the task vectors of a merge's models before merging.

:func:`inspect_merge` streams the models of a merge configuration tensor by
tensor (as the merge does) and reports, per tensor group, per layer and over
the whole model, the task vectors' norms, pairwise cosines, sign conflict
(what TIES' election rejects), top-k overlap and shares of the merged delta,
optionally the loss barrier between pairs of models, and a recommendation with
its reasons. :func:`tensor_figures` is the same on tensors in memory and
:func:`interpolation_barrier` the barrier on two state dicts.
"""

from modelfuse.inspection.barrier import Barrier, interpolation_barrier
from modelfuse.inspection.figures import TaskVectorFigures, tensor_figures
from modelfuse.inspection.groups import TENSOR_GROUPS, tensor_group, tensor_layer
from modelfuse.inspection.heatmap import inspection_heatmap
from modelfuse.inspection.merge_inspection import inspect_merge, run_inspection
from modelfuse.inspection.planning import (
    DEFAULT_DENSITY,
    DEFAULT_SAMPLE,
    InspectionPlan,
    plan_inspection,
)
from modelfuse.inspection.recommendation import THRESHOLDS, Recommendation, recommend
from modelfuse.inspection.results import MergeInspection

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_SAMPLE",
    "TENSOR_GROUPS",
    "THRESHOLDS",
    "Barrier",
    "InspectionPlan",
    "MergeInspection",
    "Recommendation",
    "TaskVectorFigures",
    "inspect_merge",
    "inspection_heatmap",
    "interpolation_barrier",
    "plan_inspection",
    "recommend",
    "run_inspection",
    "tensor_figures",
    "tensor_group",
    "tensor_layer",
]
