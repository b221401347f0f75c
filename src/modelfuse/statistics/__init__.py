"""Running models over data: Fisher diagonals and Gram matrices for data-aware merging.

Statistics are computed once, here, where a model and data are at hand, and
saved as safetensors keyed by the model's parameter names; the merge engine
then reads them like any other tensors (``statistics: FILE`` per model in a
merge configuration).

Text batches padded by a tokenizer (with an ``attention_mask``) give the
statistics of their texts run one at a time (:mod:`modelfuse.statistics.padding`);
Hugging Face sequence classifiers are loaded and batched by
:mod:`modelfuse.statistics.huggingface`.
"""

from modelfuse.statistics.batches import evaluation_mode
from modelfuse.statistics.fisher import FisherKind, fisher_diagonal
from modelfuse.statistics.gram import (
    UnusedLayerWarning,
    WrittenStatistics,
    gram_matrices,
    gram_passes,
    write_gram_matrices,
)
from modelfuse.statistics.padding import padding_mask, unpadded
from modelfuse.statistics.sharded import combine_shards, shard_batches, sharded_statistics
from modelfuse.statistics.storage import (
    Statistics,
    StatisticsKind,
    StatisticsWriter,
    load,
    save,
)

__all__ = [
    "FisherKind",
    "Statistics",
    "StatisticsKind",
    "StatisticsWriter",
    "UnusedLayerWarning",
    "WrittenStatistics",
    "combine_shards",
    "evaluation_mode",
    "fisher_diagonal",
    "gram_matrices",
    "gram_passes",
    "load",
    "padding_mask",
    "save",
    "shard_batches",
    "sharded_statistics",
    "unpadded",
    "write_gram_matrices",
]
