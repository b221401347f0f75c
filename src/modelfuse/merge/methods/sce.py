"""SCE: select the task-vector entries that vary most, calculate weights, erase minority signs.

The selection (an exact top-k of the per-entry variance over the whole tensor)
and the weights (each task vector's mean square over the tensor) are
whole-tensor values: :func:`sce_reduction` finds them chunk by chunk, holding
no float32 copy of any tensor, and any block of rows then merges alone with
them (the engine's per-tensor reduction). Every step is computed in chunks of
2**18 entries at fixed flat positions, so a tensor merged whole and the same
tensor merged in blocks of rows give the same bytes, whatever the threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.chunk_threads import chunk_workers, ordered_map
from modelfuse.merge.methods.float_sums import row_sum
from modelfuse.merge.methods.magnitude_selection import sample_stride, select_top_k
from modelfuse.merge.methods.magnitude_threshold import TensorSelection, count_ones, scratch_buffer
from modelfuse.merge.methods.sign_consensus import agreeing_sums
from modelfuse.merge.methods.sparsification import chunk_size, chunk_slices
from modelfuse.merge.methods.workspace import Workspace
from modelfuse.merge.parameters import MethodParameters

__all__ = [
    "HELD_TASK_VECTORS",
    "SceParameters",
    "SceReduction",
    "WEIGHT_EPS",
    "sce",
    "sce_reduction",
    "sce_selection",
    "sce_weights",
]

WEIGHT_EPS = 1e-6
"""Below this sum the models' weights are equal (``1 / N``), and the agreeing weight of an
entry divides at least by this (mergekit 0.1.5's constants)."""


class SceParameters(MethodParameters):
    """Parameters of :func:`sce` (mergekit's ``sce``)."""

    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of the entries with nonzero variance across the task vectors "
        "kept (those of largest variance); 1 keeps every entry",
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit configurations (a memory option there); "
        "no effect on the result",
    )


@dataclass(frozen=True)
class SceReduction:
    """The whole-tensor values of :func:`sce`: its selection and its weights.

    Attributes
    ----------
    selection : TensorSelection or None
        The entries kept by the selection step: variance above ``value``, or
        equal to it at a flat index below ``cutoff``; None keeps every entry.
    weights : tuple of float
        One weight per model (:func:`sce_weights`).
    """

    selection: TensorSelection | None
    weights: tuple[float, ...]


KEPT_VARIANCES = 1 << 23
"""Tensors of at most this many entries (32 MB of float32 variances) compute their
variances once for the reduction's passes (nonzero count, selection, weights); larger
ones compute them again in each pass, so that memory stays bounded."""


HELD_TASK_VECTORS = 64 * 1024 * 1024
"""A tensor merged whole keeps its float32 task vectors for the passes of its reduction and
merge when they take at most this many bytes; larger ones compute them in each pass."""


class _Inputs:
    """The task vectors of one tensor (or a block of it), chunk by chunk in float32.

    With ``hold`` (and task vectors of at most :data:`HELD_TASK_VECTORS` bytes) each
    chunk's task vectors are computed once and handed out again; callers then must not
    modify them, but the last pass (:meth:`release` says which chunk it is done with).
    """

    def __init__(
        self, tensors: Sequence[torch.Tensor], base: torch.Tensor, offset: int, hold: bool = False
    ) -> None:
        self.flats = [t.reshape(-1) for t in tensors]
        self.base = base.reshape(-1)
        self.size = self.base.numel()
        self.offset = offset
        self.chunk = chunk_size("magnitude", (1, 1), self.size)
        self._kept: list[torch.Tensor] | None = None
        held = hold and 4 * self.size * len(self.flats) <= HELD_TASK_VECTORS
        self._held: dict[int, list[torch.Tensor]] | None = {} if held else None
        # with held task vectors, the selection's 0/1 masks made by the weights pass
        self._masks: dict[int, torch.Tensor] | None = {} if held else None
        # task vectors spent as soon as they are computed go to buffers reused from chunk
        # to chunk, one set per thread: new tensors for every chunk of a large tensor leave
        # the allocator's heaps fragmented (over 200 MB kept after one embedding)
        self._spaces = threading.local()

    def _space(self) -> Workspace:
        space: Workspace | None = getattr(self._spaces, "space", None)
        if space is None:
            space = self._spaces.space = Workspace(self.chunk)
        return space

    def slices(self) -> Iterator[slice]:
        return chunk_slices(self.size, self.chunk, self.offset)

    def taus(self, index: slice) -> list[torch.Tensor]:
        if self._held is None or index.step is not None:
            return self._taus(index)
        taus = self._held.get(index.start)
        if taus is None:
            taus = self._held[index.start] = self._taus(index)
        return taus

    def release(self, index: slice) -> list[torch.Tensor]:
        """The chunk's task vectors for its last use: the caller may modify them, until it
        asks for the next chunk's (in the same thread)."""
        if self._held is None:
            return self._taus(index, self._space(), "merge")
        taus = self._held.pop(index.start, None)
        return self._taus(index) if taus is None else taus

    def hold_mask(self, index: slice, mask: torch.Tensor) -> None:
        """Keep the chunk's selection mask for the merge (when the task vectors are held)."""
        if self._masks is not None:
            self._masks[index.start] = mask

    @property
    def holds_masks(self) -> bool:
        return self._masks is not None

    def forget_variances(self) -> None:
        """Drop the kept variances (the held masks took their place)."""
        self._kept = None

    def take_mask(self, index: slice) -> torch.Tensor | None:
        """The chunk's selection mask kept by the weights pass (handed out once), or None."""
        return None if self._masks is None else self._masks.pop(index.start, None)

    def _taus(
        self, index: slice, space: Workspace | None = None, use: str = ""
    ) -> list[torch.Tensor]:
        """The chunk's task vectors: new tensors, or with ``space`` its buffers for ``use``."""
        base = self.base[index]
        if base.dtype != torch.float32:
            if space is None:
                buffer = torch.empty(base.shape)
            else:
                buffer = space.get(f"{use} base", base.numel())
            base = buffer.copy_(base)
        taus = []
        for i, flat in enumerate(self.flats):
            part = flat[index]
            # converted, then the base subtracted in place: one tensor per model
            if space is None:
                tau = torch.empty(part.shape)
            else:
                tau = space.get(f"{use} task vector {i}", part.numel())
            if part.dtype == torch.float32:
                taus.append(torch.sub(part, base, out=tau))
            else:
                taus.append(tau.copy_(part).sub_(base))
        return taus

    def variance(self, index: slice) -> torch.Tensor:
        if self._held is None and index.step is None:  # spent at once: in this thread's buffers
            return _variance(self._taus(index, self._space(), "variance"))
        return _variance(self.taus(index))

    def _spent_variance(self, index: slice) -> torch.Tensor:
        """The chunk's variances in this thread's buffers, valid until the next call."""
        space = self._space()
        return _variance_and_sum(self._taus(index, space, "variance"), space)[0]

    def kept_variances(self) -> Iterator[torch.Tensor] | None:
        """The variances the reduction kept (see :meth:`variances`), or None."""
        return None if self._kept is None else iter(self._kept)

    def variances(self) -> Iterator[torch.Tensor]:
        """The variances chunk by chunk; a tensor of at most :data:`KEPT_VARIANCES`
        entries computes them once and keeps them for the reduction's next passes."""
        if self._kept is not None:
            return iter(self._kept)
        if self.size > KEPT_VARIANCES:
            if chunk_workers() <= 1:  # each chunk's spent before the next: buffers reused
                return map(self._spent_variance, self.slices())
            return ordered_map(self.variance, self.slices())
        self._kept = list(ordered_map(self.variance, self.slices()))
        return iter(self._kept)


def _variance(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The population variance over the models, entry by entry (float32, two passes)."""
    return _variance_and_sum(taus)[0]


def _variance_and_sum(
    taus: Sequence[torch.Tensor], space: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The population variance over the models and the sum of the task vectors: new
    tensors, or with ``space`` its buffers."""
    n = len(taus)
    length = taus[0].numel()

    def buffer(key: str) -> torch.Tensor:
        return torch.empty(taus[0].shape) if space is None else space.get(key, length)

    total = _summed(taus, buffer("sum"))
    mean = torch.div(total, n, out=buffer("mean"))
    # the first square starts the sum (0 + x is x); the last deviation is written over
    # the mean, which it no longer needs
    variance = torch.sub(taus[0], mean, out=buffer("variance"))
    variance.mul_(variance)
    deviation: torch.Tensor | None = None
    for i in range(1, n):
        if i == n - 1:
            deviation = torch.sub(taus[i], mean, out=mean)
        else:
            if deviation is None:
                deviation = buffer("deviation")
            deviation = torch.sub(taus[i], mean, out=deviation)
        variance.addcmul_(deviation, deviation)
    return variance.div_(n), total


def _summed(taus: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The task vectors' sum, added in model order, in a new tensor or ``out``."""
    if out is None:
        out = torch.empty_like(taus[0])
    total = out.copy_(taus[0]) if len(taus) == 1 else torch.add(taus[0], taus[1], out=out)
    for tau in taus[2:]:
        total.add_(tau)
    return total


def _select(inputs: _Inputs, select_topk: float) -> TensorSelection | None:
    """The selection step over a whole tensor, chunk by chunk (see :func:`sce_selection`)."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return TensorSelection(float("inf"), 0)
    nonzero = 0
    scratch: dict[str, torch.Tensor] = {}
    for variance in inputs.variances():
        # compared into floats and summed (a chunk's count is below 2**24: exact), many
        # times faster than count_nonzero, whose loop over floats is not vectorised
        flags = scratch_buffer(scratch, "nonzero", variance.numel()).view(variance.shape)
        nonzero += count_ones(torch.ne(variance, 0.0, out=flags))
    k = int(nonzero * select_topk)
    if k == 0:
        return TensorSelection(float("inf"), 0)
    n = inputs.size
    sample = None
    if n > 2 * (1 << 16):
        stride = sample_stride(n)
        sample = _variance(inputs.taus(slice(None, None, stride)))
    threshold = select_top_k(inputs.variances, k, n, sample)
    return TensorSelection.of(threshold, inputs.variances)


def _masker(selection: TensorSelection, inputs: _Inputs) -> Callable[..., torch.Tensor]:
    """Masks the variances of the inputs' chunks, given in order, as 0/1 floats."""
    within = selection.within(inputs.offset, inputs.size, inputs.variances)
    return within.masker(dtype=torch.float32)


def _weights(inputs: _Inputs, selection: TensorSelection | None) -> tuple[float, ...]:
    """The calculation step over a whole tensor, chunk by chunk (see :func:`sce_weights`)."""
    sums = [0.0] * len(inputs.flats)
    masker = None if selection is None else _masker(selection, inputs)
    slices = list(inputs.slices())
    if masker is None:

        def squares(index: slice) -> list[float]:
            taus = inputs.taus(index)  # may be held for the merge: left unchanged
            scratch = torch.empty_like(taus[0])
            return [row_sum(torch.mul(tau, tau, out=scratch)) for tau in taus]

        shares: Iterator[list[float]] = ordered_map(squares, slices)
    else:
        kept = inputs.kept_variances()

        def chunk(index: slice) -> tuple[slice, list[torch.Tensor], torch.Tensor | None]:
            taus = inputs.taus(index)  # may be held for the merge: left unchanged
            return index, taus, None if kept is not None else _variance(taus)

        def masked(item: tuple[slice, list[torch.Tensor], torch.Tensor | None]) -> list[float]:
            # the masker counts ties in chunk order: masks are made here, in order (and
            # kept for the merge when the task vectors are)
            index, taus, variance = item
            if kept is not None:
                variance = next(kept)
            # the variances are spent once masked, unless the merge needs them again
            spent = kept is None or inputs.holds_masks
            mask = masker(variance, out=variance if spent else None)
            inputs.hold_mask(index, mask)
            scratch = torch.empty_like(mask)
            shares = []
            for tau in taus:
                torch.mul(tau, mask, out=scratch)
                shares.append(row_sum(scratch.mul_(scratch)))
            return shares

        shares = map(masked, ordered_map(chunk, slices))
    # chunk shares added in chunk order: the same sums on any number of threads
    for share in shares:
        for i, value in enumerate(share):
            sums[i] += value
    if masker is not None and inputs.holds_masks:
        inputs.forget_variances()  # overwritten by the masks
    return _normalised([s / inputs.size for s in sums] if inputs.size else sums)


def _normalised(squares: Sequence[float]) -> tuple[float, ...]:
    total = sum(squares)
    if abs(total) < WEIGHT_EPS:
        return tuple([1.0 / len(squares)] * len(squares))
    return tuple(s / total for s in squares)


def _check(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        raise ConfigError("sce needs a base model; set base_model")
    if not tensors:
        raise ConfigError("sce: no models besides the base; give at least one")
    return base


def sce_reduction(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, select_topk: float = 1.0
) -> SceReduction:
    """The per-tensor reduction of :func:`sce`: its selection and weights over the whole
    tensor, found chunk by chunk (no float32 copy of a tensor is held); with them any
    block of rows merges alone.

    Examples
    --------
    >>> taus = [torch.tensor([1.0, -2.0, 2.0]), torch.tensor([-1.0, -2.0, 4.0])]
    >>> sce_reduction(taus, torch.zeros(3)).weights  # mean squares 3 and 7
    (0.3, 0.7)
    """
    return _reduction(_Inputs(tensors, _check(tensors, base), 0), select_topk)


def _reduction(inputs: _Inputs, select_topk: float) -> SceReduction:
    selection = _select(inputs, select_topk)
    return SceReduction(selection, _weights(inputs, selection))


def sce_selection(taus: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """The selection step: a 0/1 float32 mask of the ``k = int(select_topk * nnz)``
    entries of largest variance across ``taus`` (population variance, over the
    models; ``nnz`` the entries whose variance is nonzero), among equal variances
    the lower flat position first. None when ``select_topk >= 1`` (all kept).

    Examples
    --------
    >>> taus = [torch.tensor([1.0, 0.0, 5.0, 2.0]), torch.tensor([-1.0, 0.0, 5.0, 0.0])]
    >>> sce_selection(taus, 0.5)  # variances 1, 0, 0, 1: nnz = 2, k = 1
    tensor([1., 0., 0., 0.])
    """
    inputs = _Inputs(taus, torch.zeros_like(taus[0]), 0)
    selection = _select(inputs, select_topk)
    if selection is None:
        return None
    masker = _masker(selection, inputs)
    return torch.cat([masker(v) for v in inputs.variances()]).reshape(taus[0].shape)


def sce_weights(taus: Sequence[torch.Tensor]) -> list[float]:
    r"""The calculation step: :math:`w_i = \overline{\tau_i^2} / \sum_j \overline{\tau_j^2}`,
    the mean square of each (selected) task vector over the tensor, normalised over the
    models; equal weights ``1 / N`` when the sum is below :data:`WEIGHT_EPS`.

    Examples
    --------
    >>> sce_weights([torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])])
    [0.16666666666666666, 0.8333333333333334]
    """
    return list(_weights(_Inputs(taus, torch.zeros_like(taus[0]), 0), None))


def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    reduced: SceReduction | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""SCE: select, calculate, erase, merge (mergekit's ``sce``).

    With task vectors :math:`\tau_i = \theta_i - \theta_b`:

    1. select: unless ``select_topk`` is 1, keep only the ``select_topk``
       fraction of the entries with nonzero variance across the :math:`\tau_i`
       that vary most (:func:`sce_selection`), in every task vector;
    2. calculate: :math:`w_i = \overline{\tau_i^2} / \sum_j \overline{\tau_j^2}`
       over the tensor (:func:`sce_weights`);
    3. erase: elect :math:`\gamma = \operatorname{sign}(\sum_i \tau_i)` per
       entry (ties to +) and erase the entries whose sign is not
       :math:`\gamma` (zeros included);
    4. merge: :math:`\theta = \theta_b + \sum_i w_i e_i \tau_i / \max(\sum_i
       w_i e_i, 10^{-6})`, with :math:`e_i` 1 where :math:`\tau_i` was kept.

    The selection and the weights are whole-tensor values (:func:`sce_reduction`,
    found from the inputs unless ``reduced`` gives them); the rest is elementwise,
    computed chunk by chunk.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    select_topk : float, default 1.0
        Fraction of the varying entries kept, in [0, 1].
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.
    reduced : SceReduction, optional
        :func:`sce_reduction` of the whole tensor, when the inputs are a block
        of rows of it (the engine's row blocks).
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Wan, Zhong, Huang, Quan, Bi and Shi, "FuseChat: knowledge fusion of chat models",
    2024. https://arxiv.org/abs/2408.07990

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 2.0]), torch.tensor([-1.0, -2.0, 4.0])
    >>> sce([a, b], base)  # mean squares 3 and 7: weights 0.3 and 0.7
    tensor([ 1.0000, -2.0000,  3.4000])
    """
    del int8_mask
    base = _check(tensors, base)
    if reduced is None:
        # the reduction's chunks (task vectors and variances) serve the merge too
        inputs = _Inputs(tensors, base, offset, hold=True)
        reduced = _reduction(inputs, select_topk)
    else:
        inputs = _Inputs(tensors, base, offset)
    if len(reduced.weights) != len(tensors):
        raise ConfigError(f"sce: {len(reduced.weights)} weights for {len(tensors)} models")
    selection = reduced.selection
    masker: Callable[..., torch.Tensor] | None = None
    kept = inputs.kept_variances() if selection is not None else None
    out = torch.empty(inputs.size, dtype=torch.float32)
    space = Workspace(inputs.chunk)
    for index in inputs.slices():
        taus = inputs.release(index)
        total: torch.Tensor | None = None
        if selection is not None:
            mask = inputs.take_mask(index)  # the weights pass's, when it held them
            if mask is None:
                if masker is None:
                    masker = _masker(selection, inputs)
                if kept is not None:  # the reduction's, of these same task vectors
                    variance = next(kept)
                else:
                    variance, total = _variance_and_sum(taus)
                mask = masker(variance)
                del variance
            for tau in taus:
                tau.mul_(mask)
            if total is not None:
                total.mul_(mask)  # the sum of the masked task vectors (a 0/1 mask)
            del mask
        if total is None:
            total = _summed(taus)
        # the sum elects the signs (ties to +), then is spent: it takes the result
        divisor = space.get("divisor", total.numel())
        weights = reduced.weights
        merged = agreeing_sums(taus, weights, weights, total, total, divisor, space)
        # base + merged / divisor in one pass, rounded as the division, then the sum (the
        # base converted into a reused buffer, as the task-vector merges do)
        base_part = inputs.base[index]
        if base_part.dtype != torch.float32:
            base_part = space.get("base", base_part.numel()).copy_(base_part)
        torch.addcdiv(base_part, merged, divisor.clamp_(min=WEIGHT_EPS), out=out[index])
    return out.reshape(base.shape)
