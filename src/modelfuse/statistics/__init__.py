"""Running models over data: Fisher diagonals and Gram matrices for data-aware merging.

Statistics are computed once, here, where a model and data are at hand, and
saved as safetensors keyed by the model's parameter names; the merge engine
then reads them like any other tensors (``statistics: FILE`` per model in a
merge configuration).
"""

from modelfuse.statistics.batches import evaluation_mode
from modelfuse.statistics.fisher import FisherKind, fisher_diagonal
from modelfuse.statistics.gram import UnusedLayerWarning, gram_matrices
from modelfuse.statistics.sharded import combine_shards, shard_batches, sharded_statistics
from modelfuse.statistics.storage import Statistics, StatisticsKind, load, save

__all__ = [
    "FisherKind",
    "Statistics",
    "StatisticsKind",
    "UnusedLayerWarning",
    "combine_shards",
    "evaluation_mode",
    "fisher_diagonal",
    "gram_matrices",
    "load",
    "save",
    "shard_batches",
    "sharded_statistics",
]
