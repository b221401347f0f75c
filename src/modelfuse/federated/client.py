"""Client-side helpers: compute the statistics an aggregation reads, and pack the reply.

A Flower ``ClientApp`` trains its model, then::

    needs = requested_statistics(message.content["config"])
    stats = client_statistics(model, batches, needs, snapshots=snapshots)
    return Message(client_reply(model, n_train, statistics=stats), reply_to=message)

Fisher diagonals and Gram matrices come from :mod:`modelfuse.statistics`;
only :func:`client_reply` imports Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import short
from modelfuse.statistics import fisher_diagonal, gram_matrices

__all__ = [
    "STATISTICS",
    "STATISTICS_KEY",
    "VARIANCE_KEY",
    "client_reply",
    "client_statistics",
    "requested_statistics",
    "trajectory_variance",
]

STATISTICS_KEY = "modelfuse-statistics"
"""The key of the training ConfigRecord that lists the statistics the server needs."""

VARIANCE_KEY = "update-variance"
"""The key of the reply's MetricRecord holding the update's estimated variance."""

STATISTICS = ("fisher", "gram", "variance")
"""The statistics a client may be asked for."""


def requested_statistics(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The statistics the server asks for in a training message's ConfigRecord.

    Examples
    --------
    >>> requested_statistics({"modelfuse-statistics": "fisher", "lr": 0.1})
    ('fisher',)
    >>> requested_statistics({})
    ()
    """
    value = config.get(STATISTICS_KEY, "")
    if not isinstance(value, str):
        raise ConfigError(
            f"config {STATISTICS_KEY}: expected a comma-separated string, got {short(value)}"
        )
    names = tuple(name for name in value.split(",") if name)
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise ConfigError(
            f"config {STATISTICS_KEY}: unknown statistics {short(unknown)}; "
            f"valid: {', '.join(STATISTICS)}"
        )
    return names


def trajectory_variance(snapshots: Sequence[Mapping[str, torch.Tensor]]) -> float:
    r"""The variance of a client's local iterates: its update's uncertainty.

    For :math:`T \ge 2` snapshots of the parameters taken along local training
    (e.g. after each epoch), the unbiased variance across snapshots of every
    floating-point entry, averaged over the entries: the diagonal of SWAG's
    Gaussian (Maddox et al., "A simple baseline for Bayesian uncertainty in
    deep learning", NeurIPS 2019), summarised to one number. ``uncertainty``
    aggregation weighs a client by :math:`n_i / v_i`.

    Parameters
    ----------
    snapshots : sequence of mappings name -> Tensor
        State dicts of one model (copies: ``{k: v.clone() ...}``). Not modified.

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        Fewer than two snapshots, or snapshots with other tensors or shapes.

    Examples
    --------
    >>> trajectory_variance([{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 1.0])}])
    1.0
    """
    if len(snapshots) < 2:
        raise ConfigError(
            f"snapshots: {len(snapshots)} given; a variance needs at least two snapshots of the "
            "parameters along local training"
        )
    first = snapshots[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for name, value in first.items():
            if not value.dtype.is_floating_point:
                continue
            for i, snapshot in enumerate(snapshots[1:], start=1):
                other = snapshot.get(name)
                if other is None or other.shape != value.shape:
                    raise ConfigError(
                        f"snapshots: snapshot {i} has no tensor {short(name)} of shape "
                        f"{list(value.shape)}; take every snapshot of the same model"
                    )
            stacked = torch.stack([s[name].detach().to(torch.float64) for s in snapshots])
            total += float(stacked.var(dim=0, unbiased=True).sum())
            count += value.numel()
    if count == 0:
        raise ConfigError("snapshots: they hold no floating-point tensor")
    return total / count


def client_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    needs: Sequence[str],
    *,
    snapshots: Sequence[Mapping[str, torch.Tensor]] | None = None,
    n_examples: int = 1000,
) -> dict[str, Any]:
    """Compute what the server asked for (see :func:`requested_statistics`).

    Parameters
    ----------
    model : nn.Module
        The client's model after local training (left as it was found).
    batches : iterable
        Batches of ``(inputs, labels)`` or inputs (the client's training data,
        or a part of it).
    needs : sequence of {"fisher", "gram", "variance"}
        The statistics to compute.
    snapshots : sequence of state dicts, optional
        Parameters along local training, for ``"variance"``.
    n_examples : int, default 1000
        Examples used for the Fisher diagonal and the Gram matrices.

    Returns
    -------
    dict
        ``{"fisher": {name: Tensor}, "gram": {name: Tensor}, "variance": float}``,
        the requested ones only.

    Examples
    --------
    >>> model = nn.Linear(3, 2)
    >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> stats = client_statistics(model, batches, ["gram"])
    >>> {name: tuple(g.shape) for name, g in stats["gram"].items()}
    {'weight': (3, 3)}
    """
    out: dict[str, Any] = {}
    for need in needs:
        if need == "fisher":
            out["fisher"] = dict(fisher_diagonal(model, batches, n_examples=n_examples))
        elif need == "gram":
            out["gram"] = dict(gram_matrices(model, batches, n_examples=n_examples))
        elif need == "variance":
            if snapshots is None:
                raise ConfigError(
                    "snapshots: the server asks for the update variance; keep snapshots of the "
                    "parameters along local training (at least two) and pass them"
                )
            out["variance"] = trajectory_variance(snapshots)
        else:
            raise ConfigError(
                f"needs: unknown statistics {short(need)}; valid: {', '.join(STATISTICS)}"
            )
    return out


def client_reply(
    model: nn.Module | Mapping[str, torch.Tensor],
    num_examples: int,
    *,
    statistics: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    arrayrecord_key: str = "arrays",
    weighted_by_key: str = "num-examples",
) -> Any:
    """A Flower ``RecordDict`` for a training reply: the model, its example count, statistics.

    Parameters
    ----------
    model : nn.Module or state dict
        The trained model.
    num_examples : int
        Examples it was trained on (FedAvg's weight).
    statistics : dict, optional
        The result of :func:`client_statistics`: ``fisher`` and ``gram`` go in
        ArrayRecords of those names, ``variance`` in the MetricRecord as
        ``update-variance``.
    metrics : mapping, optional
        More metrics (e.g. ``{"train-loss": 0.3}``).
    arrayrecord_key, weighted_by_key : str
        The keys the strategy reads (FedAvg's defaults).

    Returns
    -------
    flwr.app.RecordDict
        ``{"arrays": ArrayRecord, "metrics": MetricRecord[, "fisher", "gram"]}``.
    """
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    state = model.state_dict() if isinstance(model, nn.Module) else model
    values: dict[str, Any] = {weighted_by_key: int(num_examples)}
    values.update({k: float(v) for k, v in (metrics or {}).items()})
    statistics = statistics or {}
    if "variance" in statistics:
        values[VARIANCE_KEY] = float(statistics["variance"])
    content = RecordDict(
        {
            arrayrecord_key: ArrayRecord({k: v.detach().cpu() for k, v in state.items()}),
            "metrics": MetricRecord(values),
        }
    )
    for kind in ("fisher", "gram"):
        if kind in statistics:
            content[kind] = ArrayRecord({k: v.detach().cpu() for k, v in statistics[kind].items()})
    return content
