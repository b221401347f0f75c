"""Statistics computed per data shard on an executor and combined exactly.

Fisher diagonals are means over examples, so the statistic of the whole
dataset is the mean of the shards' statistics weighted by their numbers of
examples: :math:`S = \\sum_i n_i S_i / \\sum_i n_i`. Gram matrices are means
over rows (examples times positions for sequences), so shards return their
float64 sums and row counts, which add up exactly. Each shard runs as one item
of an executor (:mod:`modelfuse.executors`), on local processes or a Ray
cluster, and the combination is done in float64 in the caller.
:func:`shard_batches` cuts batches into shards of (nearly) equal numbers of
examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.executors import Executor, resolve_executor
from modelfuse.statistics.batches import Inputs, count_examples, iterate_batches
from modelfuse.statistics.fisher import fisher_diagonal
from modelfuse.statistics.gram import GramSums, add_gram_sums, gram_matrices, gram_sums
from modelfuse.statistics.storage import Statistics

__all__ = [
    "STATISTICS",
    "ShardedStatistic",
    "combine_shards",
    "shard_batches",
    "sharded_statistics",
]

ShardedStatistic = Literal["fisher", "gram"]

STATISTICS: dict[str, Callable[..., Statistics]] = {
    "fisher": fisher_diagonal,
    "gram": gram_matrices,
}


class _Shard:
    """One shard of batches, named by its position and size in errors."""

    def __init__(self, index: int, batches: Iterable[Any]) -> None:
        self.index = index
        self.batches = batches

    def __repr__(self) -> str:
        size = count_examples(self.batches)
        return f"shard {self.index}" + ("" if size is None else f" of {size} examples")


class _ShardTask:
    """Compute one statistic of ``model`` on one shard; a picklable callable for executors."""

    def __init__(self, statistic: str, model: nn.Module, options: dict[str, Any]) -> None:
        self.statistic = statistic
        self.model = model
        self.options = options

    def __repr__(self) -> str:
        return f"the {self.statistic} statistics of a {type(self.model).__name__} per shard"

    def __call__(self, shard: _Shard) -> Statistics | GramSums:
        if self.statistic == "gram":  # sums and row counts, which add up across shards
            return gram_sums(self.model, shard.batches, **self.options)
        return STATISTICS[self.statistic](self.model, shard.batches, **self.options)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a compact copy when it is a view into a larger storage.

    Pickling a view sends its whole storage: a shard cut from a batch would
    carry the entire batch (or the entire dataset it was sliced from) to its worker.
    """
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return _own(inputs[start:stop])
    return {key: _own(value[start:stop]) for key, value in inputs.items()}


def shard_batches(
    batches: Iterable[Any], n_shards: int, *, n_examples: int, need_labels: bool = False
) -> list[list[Any]]:
    """Cut the first ``n_examples`` examples of ``batches`` into ``n_shards`` contiguous shards.

    The examples are read in order (at most ``n_examples`` of them, so memory
    is bounded by that many examples) and split into shards whose sizes differ
    by at most one; a batch that straddles a boundary is cut in two. Batches
    keep their form: ``(inputs, labels)`` or inputs, a tensor or a mapping of
    tensors (padding is kept, so a sequence keeps its length). Pieces that are
    views into larger tensors are copied, so that each shard pickles (to go
    to a worker) with its own examples only.

    Parameters
    ----------
    batches : iterable
        Batches as :func:`~modelfuse.statistics.fisher_diagonal` takes them.
    n_shards : int
        Shards wanted; fewer when there are fewer examples.
    n_examples : int
        Examples used in total.
    need_labels : bool, default False
        Refuse batches without labels (for the empirical Fisher), here rather
        than in a worker.

    Returns
    -------
    list of lists of batches

    Raises
    ------
    ConfigError
        ``n_shards`` or ``n_examples`` is not a positive integer.
    DataError
        The batches are malformed or empty.

    Examples
    --------
    >>> x = torch.arange(10.0).reshape(5, 2)
    >>> shards = shard_batches([x[:3], x[3:]], 2, n_examples=5)  # the first batch is cut
    >>> [[b[:, 0].tolist() for b in shard] for shard in shards]
    [[[0.0, 2.0]], [[4.0], [6.0, 8.0]]]
    >>> [[len(b) for b in shard] for shard in shard_batches([x], 3, n_examples=4)]
    [[1], [1], [2]]
    """
    for name, value in (("n_shards", n_shards), ("n_examples", n_examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, received {repr(value)[:60]}")
    kept = list(
        iterate_batches(
            batches, n_examples, device=torch.device("cpu"), need_labels=need_labels
        )
    )
    total = sum(batch.size for batch in kept)
    count = min(n_shards, total)
    bounds = [total * (i + 1) // count for i in range(count)]  # cumulative shard ends
    shards: list[list[Any]] = [[] for _ in range(count)]
    shard, seen = 0, 0
    for batch in kept:
        start = 0
        while start < batch.size:
            stop = start + min(batch.size - start, bounds[shard] - seen)
            inputs = _slice(batch.inputs, start, stop)
            labels = None if batch.labels is None else _own(batch.labels[start:stop])
            shards[shard].append(inputs if labels is None else (inputs, labels))
            seen += stop - start
            start = stop
            if seen == bounds[shard] and shard < count - 1:
                shard += 1
    return shards


def combine_shards(parts: Sequence[Statistics]) -> Statistics:
    """Mean of per-shard statistics weighted by their ``n_examples``.

    Parameters
    ----------
    parts : sequence of Statistics
        Statistics of one kind (and estimator) over disjoint shards, each with
        ``n_examples`` set and the same tensor names and shapes.

    Returns
    -------
    Statistics
        float32 tensors, ``n_examples`` the total.

    Raises
    ------
    ConfigError
        No parts, or parts of different kinds, estimators, names or shapes.

    Examples
    --------
    >>> a = Statistics({"w": torch.tensor([1.0])}, kind="fisher", n_examples=1)
    >>> b = Statistics({"w": torch.tensor([4.0])}, kind="fisher", n_examples=3)
    >>> combine_shards([a, b])["w"]
    tensor([3.2500])
    """
    if not parts:
        raise ConfigError("shards: expected at least one shard of data, received none")
    first = parts[0]
    for index, part in enumerate(parts):
        if (part.kind, part.estimator) != (first.kind, first.estimator):
            raise ConfigError(
                f"shards: shard {index} holds {part.kind}/{part.estimator} statistics, "
                f"shard 0 {first.kind}/{first.estimator}; combine statistics of one kind"
            )
        if not part.n_examples:
            raise ConfigError(
                f"shards: shard {index} has n_examples={part.n_examples!r}; "
                "every shard needs a positive number of examples"
            )
        shapes = {name: tuple(t.shape) for name, t in part.items()}
        expected = {name: tuple(t.shape) for name, t in first.items()}
        if shapes != expected:
            raise ConfigError(
                f"shards: shard {index} has other tensor names or shapes than shard 0; "
                "compute every shard with the same model"
            )
    total = sum(int(part.n_examples or 0) for part in parts)
    combined: dict[str, torch.Tensor] = {}
    for name in first:
        acc = torch.zeros(first[name].shape, dtype=torch.float64)
        for part in parts:
            acc.add_(part[name].to(torch.float64), alpha=float(part.n_examples or 0))
        combined[name] = (acc / total).to(torch.float32)
    return Statistics(combined, kind=first.kind, n_examples=total, estimator=first.estimator)


def sharded_statistics(
    statistic: ShardedStatistic,
    model: nn.Module,
    shards: Sequence[Iterable[Any]],
    *,
    executor: Executor | None = None,
    **options: Any,
) -> Statistics:
    """Compute a statistic on every shard through an executor and combine them.

    Parameters
    ----------
    statistic : {"fisher", "gram"}
        :func:`~modelfuse.statistics.fisher_diagonal` or
        :func:`~modelfuse.statistics.gram_matrices`.
    model : nn.Module
        The model; copied to each worker (not modified).
    shards : sequence of iterables of batches
        Disjoint parts of the data, each in the form the statistic takes
        (batches of inputs or ``(inputs, labels)``), e.g. from
        :func:`shard_batches`. With process or Ray executors they are sent to
        the workers, so use lists of tensors rather than generators.
    executor : Executor, optional
        Runs the shards; None runs them one after another in this process.
    **options
        Passed to the statistic for every shard (``n_examples`` limits each
        shard; ``kind`` chooses the Fisher estimator).

    Returns
    -------
    Statistics
        The same as one run over the concatenated shards, up to float
        rounding (Gram matrices from summed float64 sums and row counts, so
        sequences of any lengths combine exactly).

    Raises
    ------
    ConfigError
        Unknown statistic (the valid ones are listed) or no shards.

    Examples
    --------
    >>> from modelfuse.executors import LocalExecutor
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(3, 2)
    >>> x = torch.randn(8, 3)
    >>> parts = [[x[:5]], [x[5:]]]
    >>> split = sharded_statistics("gram", model, parts, executor=LocalExecutor())
    >>> bool(torch.allclose(split["weight"], x.T @ x / 8, atol=1e-6))
    True
    """
    if statistic not in STATISTICS:
        raise ConfigError(
            f"statistic: unknown statistic {repr(statistic)[:60]}; valid: {', '.join(STATISTICS)}"
        )
    shard_list = list(shards)
    if not shard_list:
        raise ConfigError("shards: expected at least one shard of data, received none")
    parts = resolve_executor(executor).map(
        _ShardTask(statistic, model, options),
        [_Shard(index, shard) for index, shard in enumerate(shard_list)],
    )
    if statistic == "gram":
        return add_gram_sums(parts).matrices(stacklevel=3)
    return combine_shards(parts)
