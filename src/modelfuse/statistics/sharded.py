"""Statistics computed per data shard on an executor and combined exactly.

Fisher diagonals and Gram matrices are means over examples, so the statistic
of the whole dataset is the mean of the shards' statistics weighted by their
numbers of examples: :math:`S = \\sum_i n_i S_i / \\sum_i n_i`. Each shard runs
as one item of an executor (:mod:`modelfuse.executors`), on local processes or
a Ray cluster, and the combination is done in float64 in the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.executors import Executor, resolve_executor
from modelfuse.statistics.fisher import fisher_diagonal
from modelfuse.statistics.gram import gram_matrices
from modelfuse.statistics.storage import Statistics

__all__ = ["STATISTICS", "ShardedStatistic", "combine_shards", "sharded_statistics"]

ShardedStatistic = Literal["fisher", "gram"]

STATISTICS: dict[str, Callable[..., Statistics]] = {
    "fisher": fisher_diagonal,
    "gram": gram_matrices,
}


class _ShardTask:
    """Compute one statistic of ``model`` on one shard; a picklable callable for executors."""

    def __init__(self, statistic: str, model: nn.Module, options: dict[str, Any]) -> None:
        self.statistic = statistic
        self.model = model
        self.options = options

    def __call__(self, shard: Iterable[Any]) -> Statistics:
        return STATISTICS[self.statistic](self.model, shard, **self.options)


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
        (batches of inputs or ``(inputs, labels)``). With process or Ray
        executors they are sent to the workers, so use lists of tensors rather
        than generators.
    executor : Executor, optional
        Runs the shards; None runs them one after another in this process.
    **options
        Passed to the statistic for every shard (``n_examples`` limits each
        shard; ``kind`` chooses the Fisher estimator).

    Returns
    -------
    Statistics
        The same as one run over the concatenated shards, up to float
        rounding. For Gram matrices of sequence inputs this holds when every
        example contributes the same number of rows (equal sequence lengths).

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
    parts = resolve_executor(executor).map(_ShardTask(statistic, model, options), shard_list)
    return combine_shards(parts)
