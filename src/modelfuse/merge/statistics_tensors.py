"""Checking the per-model statistics tensors a data-aware method receives for one tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modelfuse.errors import ConfigError

__all__ = ["collect_statistics"]


def collect_statistics(
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None,
    kind: str,
    n_models: int,
    *,
    method: str,
    name: str | None,
    shape: tuple[int, ...],
) -> list[torch.Tensor] | None:
    """The float32 statistics of every model for one tensor, or None when no model has any.

    Raises
    ------
    ConfigError
        Some models have statistics for the tensor and others do not, the
        number of entries is not one per model, or a shape is not ``shape``.

    Examples
    --------
    >>> stats = {"fisher": [torch.ones(2), torch.zeros(2)]}
    >>> collect_statistics(stats, "fisher", 2, method="fisher", name="w", shape=(2,))
    [tensor([1., 1.]), tensor([0., 0.])]
    >>> collect_statistics({"fisher": [None, None]}, "fisher", 2, method="fisher",
    ...                    name="w", shape=(2,)) is None
    True
    """
    where = f"{method}: tensor {name}" if name is not None else method
    entries = list((statistics or {}).get(kind, [None] * n_models))
    if len(entries) != n_models:
        raise ConfigError(
            f"{where}: {len(entries)} {kind} statistics for {n_models} models; give one per model"
        )
    present = [i for i, entry in enumerate(entries) if entry is not None]
    if not present:
        return None
    missing = [i for i, entry in enumerate(entries) if entry is None]
    if missing:
        raise ConfigError(
            f"{where}: the {kind} statistics of model(s) {', '.join(map(str, missing))} have no "
            f"entry for this tensor but those of model(s) {', '.join(map(str, present))} do; "
            "compute every model's statistics on the same architecture"
        )
    out = []
    for i, entry in enumerate(e for e in entries if e is not None):
        if tuple(entry.shape) != tuple(shape):
            raise ConfigError(
                f"{where}: the {kind} statistics of model {i} have shape {list(entry.shape)}, "
                f"expected {list(shape)}; were they computed for another model?"
            )
        out.append(entry.to(torch.float32))
    return out
