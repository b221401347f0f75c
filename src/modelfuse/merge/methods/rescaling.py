"""Rescaling what a sparsification keeps: by ``1 / density``, or to the task vector's norm.

``rescale_method: exact`` divides the kept entries by ``density`` (elementwise);
``l1`` (mergekit's ``rescale``), ``l2`` and ``linf`` multiply them by the norm of
the whole task vector before the drop over its norm after it. A norm rescale
needs the whole tensor: :func:`rescale_factors` is its per-tensor reduction,
after which any block of rows merges alone; :func:`trim_reduction` is the
magnitude trims' (TIES, breadcrumbs), their selections and, with a norm
rescale, the factors that go with them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.chunk_threads import chunk_workers, ordered_map
from modelfuse.merge.methods.float_sums import row_sum
from modelfuse.merge.methods.magnitude_threshold import TensorSelection
from modelfuse.merge.methods.random_drops import della_groups
from modelfuse.merge.methods.sparsification import (
    RescaleMethod,
    Sparsification,
    Sparsifier,
    Workspace,
    chunk_size,
    chunk_slices,
    model_sparsifiers,
    tensor_selections,
)
from modelfuse.merge.methods.workspace import TRANSIENT

__all__ = [
    "KEEP_BYTES",
    "RescaleFactors",
    "RescaledSelections",
    "elementwise_rescale",
    "rescale_factors",
    "set_norm_factors",
    "trim_reduction",
]


_NORM_EPS = 1e-7

KEEP_BYTES = 64 * 1024 * 1024
"""A norm rescale's first pass keeps what each chunk keeps (float32) for the merge pass
when all the rescaled task vectors of a tensor fit in this; else it keeps drop masks."""


def elementwise_rescale(parameters: Mapping[str, Any]) -> bool:
    """Whether a tensor's resolved parameters rescale kept entries elementwise (``"exact"``,
    or no rescale), so that a block of it merges alone; a norm rescale needs the whole
    tensor's norms (:func:`rescale_factors`)."""
    return not parameters.get("rescale", False) or parameters.get("rescale_method") == "exact"


class _NormSum:
    """A norm accumulated chunk by chunk, the same whatever the torch thread count.

    A chunk's share sums its magnitudes (l1) or squares (l2) with
    :func:`~modelfuse.merge.methods.float_sums.row_sum` (float32 rows, then
    float64), whatever the torch thread count; the shares are added in chunk
    order. So a tensor's norm is the same number whether its merge runs whole
    or as the engine's reduction before its row blocks, and whether the chunks
    were computed one after another or in parallel; its relative error is
    that of float32 sums of 2048 entries, about 1e-7 at worst.
    """

    def __init__(self, method: RescaleMethod) -> None:
        if method not in ("l1", "l2", "linf"):
            raise ConfigError(
                f"rescale_method: unknown value {method!r}; valid: exact, l1, l2, linf"
            )
        self.method = method
        self.total = 0.0

    def chunk(self, values: torch.Tensor, scratch: torch.Tensor) -> float:
        """One chunk's share: its sum of magnitudes (l1), of squares (l2) or its maximum."""
        if values.numel() == 0:
            return 0.0
        magnitudes = torch.abs(values.reshape(-1), out=scratch)
        if self.method == "linf":
            return float(magnitudes.max())
        if self.method == "l2":
            magnitudes.mul_(magnitudes)
        return row_sum(magnitudes)

    def add(self, share: float) -> None:
        if self.method == "linf":
            self.total = max(self.total, share)
        else:
            self.total += share

    def value(self) -> float:
        return float(np.sqrt(self.total)) if self.method == "l2" else self.total


@dataclass(frozen=True)
class RescaleFactors:
    """Each model's norm-rescale factor of a whole tensor, and DARE's drop masks behind it.

    Attributes
    ----------
    factors : tuple of float
        Per model: the multiplier of what it keeps (1 when it is not rescaled).
    masks : tuple of numpy.ndarray or None
        Per model: the keep mask of random drops over the whole tensor, one bit
        per flat entry (``numpy.packbits``; ``n / 8`` bytes), so that a merge
        given these factors (whole, or a block at its offset) applies the
        masks the factors were found with instead of drawing them again; None
        for other sparsifications.
    """

    factors: tuple[float, ...]
    masks: tuple[np.ndarray | None, ...]

    def __len__(self) -> int:
        return len(self.factors)


def set_norm_factors(
    sparsifiers: Sequence[Sparsifier | None],
    deltas: Sequence[Callable[[slice, torch.Tensor | None], torch.Tensor]],
    size: int,
    chunk: int,
    workspace: Workspace,
    *,
    hold: bool = True,
) -> list[float]:
    """Each norm-rescaling sparsifier's factor over the whole tensor, set on it and returned.

    As mergekit's ``rescale``: the norm of the task vector before the drop over
    the norm of what is kept, or 1 when either is below 1e-7. One pass over
    the tensor per such model, chunk by chunk from flat index 0 (so the result
    is the same for the whole merge and the engine's reduction). Random drops
    draw each chunk from its position alone, so with more than one torch
    thread their chunks run in parallel (the per-chunk norms are still added
    in chunk order: the same factors).

    The merge pass then needs what each chunk keeps again: with ``hold``, for
    a tensor whose task vectors fit in :data:`KEEP_BYTES` (float32), the kept
    chunks are held (:meth:`Sparsifier.take`), so the merge reads and draws
    nothing twice; otherwise random drops are recorded as one bit per entry
    (what a reduction hands to the blocks).
    """
    factors = []
    rescaled = sum(s is not None and s.norm is not None for s in sparsifiers)
    keep = hold and size * rescaled * 4 <= KEEP_BYTES
    slices = list(chunk_slices(size, chunk, 0))
    workers = min(chunk_workers(), len(slices))
    local = threading.local()  # one set of chunk buffers per thread
    for sparsifier, delta_of in zip(sparsifiers, deltas):
        if sparsifier is None or sparsifier.norm is None:
            factors.append(1.0 if sparsifier is None else sparsifier.factor)
            continue
        before, after = _NormSum(sparsifier.norm), _NormSum(sparsifier.norm)
        random = sparsifier.method in ("random", "della_magprune")
        if random and not keep:
            sparsifier.start_recording()
        # what the chunks keep is written in place into one tensor, chunk by chunk
        held = torch.empty(size, dtype=torch.float32) if keep else None
        if keep:
            sparsifier.kept = {}

        def share(
            index: slice,
            space: Workspace,
            sparsifier: Sparsifier = sparsifier,
            delta_of: Callable[[slice, torch.Tensor | None], torch.Tensor] = delta_of,
            before: _NormSum = before,
            after: _NormSum = after,
            held: torch.Tensor | None = held,
        ) -> tuple[float, float]:
            length = index.stop - index.start
            scratch = space.get(TRANSIENT, length)
            target = space.get("delta", length) if held is None else held[index]
            delta = delta_of(index, target)
            norm_before = before.chunk(delta, scratch)
            kept = sparsifier(delta, index.start, space)
            if held is not None and sparsifier.kept is not None:
                if kept.data_ptr() != target.data_ptr():  # a magnitude trim's own buffer
                    kept = target.copy_(kept)
                sparsifier.kept[index.start] = kept
            return norm_before, after.chunk(kept, scratch)

        if workers > 1 and sparsifier.stateless:
            shares = ordered_map(functools.partial(_own_workspace, share, local, chunk), slices, workers)
        else:
            shares = (share(index, workspace) for index in slices)
        for norm_before, norm_after in shares:
            before.add(norm_before)
            after.add(norm_after)
        sparsifier.recording = False
        sparsifier.restart()
        ratio = 1.0
        if before.value() >= _NORM_EPS and after.value() >= _NORM_EPS:
            ratio = before.value() / after.value()
        sparsifier.factor = ratio
        factors.append(ratio)
    return factors


def _own_workspace(
    share: Callable[[slice, Workspace], tuple[float, float]],
    local: threading.local,
    chunk: int,
    index: slice,
) -> tuple[float, float]:
    """``share(index, workspace)`` with this thread's own chunk buffers."""
    space = getattr(local, "workspace", None)
    if space is None:
        space = local.workspace = Workspace(chunk)
    return share(index, space)


def rescale_factors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    sparsification: Sparsification = "random",
    rescale: bool = True,
    rescale_method: RescaleMethod = "l1",
    generator: torch.Generator | None = None,
    method: str = "task-vector merge",
    epsilon: Sequence[float] | float | None = None,
) -> RescaleFactors:
    r"""Each model's norm-rescale factor of a whole tensor: the per-tensor reduction of a
    norm rescale (DARE's, as mergekit's ``rescale``).

    For model i with task vector :math:`	au_i` and what its sparsification
    keeps, :math:`\hat	au_i`, the factor is :math:`\|	au_i\| / \|\hat	au_i\|`
    (``rescale_method``'s norm), or 1 when either norm is below 1e-7, when
    ``density >= 1`` or when ``rescale`` is off or ``"exact"`` (whose factor is
    ``1 / density``, elementwise). With these, any block of rows is merged alone
    by :func:`generalized_task_arithmetic` (``rescale_factors`` and ``offset``)
    exactly as the whole tensor would be. ``generator`` must be the one the
    merge uses: random drops are drawn as the merge draws them, and kept (one
    bit per entry) for the merge to apply.

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> tau = torch.tensor([1.0, -2.0, 3.0, 4.0])
    >>> rescale_factors([tau], base, density=0.5, sparsification="magnitude").factors  # 10 / 7
    (1.4285714285714286,)
    """
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    base_flat = base.reshape(-1)
    size = base_flat.numel()
    groups = della_groups(base.shape)
    chunk = chunk_size(sparsification, groups, size)
    workspace = Workspace(chunk)
    sparsifiers, deltas = model_sparsifiers(
        [t.reshape(-1) for t in tensors],
        base_flat,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        groups=groups,
        sparsification=sparsification,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=generator,
        magnitude_thresholds=None,
        selections=None,
        offset=0,
        name="",
        chunk=chunk,
        workspace=workspace,
        method=method,
    )
    factors = set_norm_factors(sparsifiers, deltas, size, chunk, workspace, hold=False)
    rescaled = [s is not None and s.norm is not None for s in sparsifiers]
    return RescaleFactors(
        tuple(f if r else 1.0 for f, r in zip(factors, rescaled)),
        tuple(s.mask if s is not None and r else None for s, r in zip(sparsifiers, rescaled)),
    )


@dataclass(frozen=True)
class RescaledSelections:
    """A magnitude trim's selections of a whole tensor and the norm-rescale factors they give.

    Attributes
    ----------
    selections : tuple of list of TensorSelection
        Per model, as :func:`~modelfuse.merge.methods.sparsification.tensor_selections`.
    factors : RescaleFactors
        Per model, the norm of its task vector over the norm of what its
        selections keep (1 when it is not rescaled).
    """

    selections: tuple[list[TensorSelection], ...]
    factors: RescaleFactors

    def __len__(self) -> int:
        return len(self.selections)


def trim_reduction(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    sparsification: Sparsification = "magnitude",
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
    method: str = "task-vector merge",
) -> list[list[TensorSelection]] | RescaledSelections:
    """The per-tensor reduction of the magnitude trims (TIES, breadcrumbs): each model's
    selections of the whole tensor, and with a norm rescale (``rescale`` and a
    ``rescale_method`` other than ``"exact"``) the factors found with them, in one
    more pass chunk by chunk from flat index 0, as the whole tensor's merge finds them.

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> tau = torch.tensor([1.0, -2.0, 3.0, 4.0])
    >>> reduced = trim_reduction([tau], base, density=0.5, rescale=True)  # 10 / 7
    >>> reduced.selections, reduced.factors.factors
    (([TensorSelection(value=3.0, cutoff=None)],), (1.4285714285714286,))
    """
    selections = tensor_selections(
        tensors,
        base,
        density=density,
        gamma=gamma,
        sparsification=sparsification,
        method=method,
    )
    if not rescale or rescale_method == "exact" or base is None:
        return selections
    base_flat = base.reshape(-1)
    size = base_flat.numel()
    chunk = chunk_size(sparsification, (1, 1), size)
    workspace = Workspace(chunk)
    sparsifiers, deltas = model_sparsifiers(
        [t.reshape(-1) for t in tensors],
        base_flat,
        density=density,
        gamma=gamma,
        epsilon=None,
        groups=(1, 1),
        sparsification=sparsification,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=torch.Generator(),  # magnitude trims draw nothing: leave torch's own alone
        magnitude_thresholds=None,
        selections=selections,
        offset=0,
        name="",
        chunk=chunk,
        workspace=workspace,
        method=method,
    )
    factors = set_norm_factors(sparsifiers, deltas, size, chunk, workspace, hold=False)
    rescaled = [s is not None and s.norm is not None for s in sparsifiers]
    return RescaledSelections(
        tuple(selections),
        RescaleFactors(tuple(f if r else 1.0 for f, r in zip(factors, rescaled)), (None,) * len(rescaled)),
    )
