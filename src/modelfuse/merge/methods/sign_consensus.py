"""TIES' sign election and disjoint sum, chunk by chunk: the sum elects the signs, then
each model's agreeing entries are added."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from modelfuse.merge.methods.sparsification import Sparsifier, Workspace

__all__ = ["ConsensusMethod", "agreeing_sums", "elect_signs"]

ConsensusMethod = Literal["sum", "count"]

_SIGN_BIT = -(2**31)
"""A float32's sign bit, as an int32."""

_SMALLEST = 2.0**-149
"""The smallest positive float32: clamping to it changes only zeros."""


def elect_signs(
    flats: Sequence[torch.Tensor],
    base_part: torch.Tensor,
    index: slice,
    start: int,
    sparsifiers: Sequence[Sparsifier | None],
    weights: Sequence[float],
    consensus_method: ConsensusMethod,
    normalize: bool,
    workspace: Workspace,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES' sign election and disjoint sum over one chunk, in two passes over the
    models' weighted task vectors (kept for the second: a chunk each). A positive
    weight (times the rescale factor) multiplies a task vector where it is added,
    not in a pass of its own; a weight of zero or below first (it changes signs).

    The first pass sums them (``"sum"``) or their signs (``"count"``), which
    elects a sign per entry, ties to +; the second adds each model's entries
    whose sign is the elected one, and (``normalize``) the weights of the models
    that contributed them, as mergekit 0.1.5 does (:func:`agreeing_sums`). Returns
    the sums and, with ``normalize``, the sums of weights that divide them (a zero
    sum of weights counts as one), else None: the caller divides, so that the
    division may share a pass with what follows it.
    """
    length = base_part.numel()
    total = workspace.get("total", length)
    votes = workspace.zeros("votes", length) if consensus_method == "count" else None
    scratch = workspace.get("scratch", length)
    deltas = []
    scales = []
    for i, w in enumerate(weights):
        sparsifier = sparsifiers[i]
        kept = None if sparsifier is None else sparsifier.take(index.start, length)
        if kept is not None and sparsifier is not None:  # held by the norm pass
            delta, scale = kept, w * sparsifier.factor
        else:
            own = workspace.get(f"delta{i}", length)
            delta = torch.sub(flats[i][index], base_part, out=own)
            scale = w
            if sparsifier is not None:
                delta = sparsifier(delta, start)
                scale = w * sparsifier.factor
                if delta.data_ptr() != own.data_ptr():  # in the sparsifier's own buffer
                    delta = own.copy_(delta)
        if scale <= 0:  # the weighted values' signs differ from the values': weigh them first
            delta, scale = delta.mul_(scale), 1.0
        # a positive weight keeps the signs: it multiplies where the values are added (the
        # first model's start the sum: 0 + x is x)
        if i == 0:
            torch.mul(delta, scale, out=total)
        else:
            total.add_(delta, alpha=scale)
        if votes is not None:
            votes.add_(torch.sign(delta, out=scratch))
        deltas.append(delta)
        scales.append(scale)
    tally = votes if votes is not None else total
    divisor = workspace.get("divisor", length) if normalize else None
    # the tally's buffer (the sum) is spent once the signs are elected: it takes the result
    merged = agreeing_sums(deltas, scales, weights, tally, total, divisor, workspace)
    if divisor is not None:
        if min(weights) >= 0:
            # a zero sum of weights counts as one: with no negative weight, the sum is zero
            # only where no model agreed, where the merged value is zero (0 / x is 0 / 1)
            divisor.clamp_(min=_SMALLEST)
        else:
            divisor.add_(torch.eq(divisor, 0.0, out=workspace.get("agree", length)))
    return merged, divisor


def agreeing_sums(
    values: Sequence[torch.Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    tally: torch.Tensor,
    merged: torch.Tensor,
    divisor: torch.Tensor | None,
    workspace: Workspace,
) -> torch.Tensor:
    """TIES' disjoint sum of one chunk, once the ``tally`` elects the signs (+ where it is
    >= 0, else -): ``merged`` becomes the sum of ``scales[i] * values[i]`` over the
    entries whose sign is the elected one (zeros agree with neither) and ``divisor``,
    when given, the sum of ``weights[i]`` over them. ``merged`` may be the tally's own
    buffer. Only float arithmetic: comparisons write float32, never bools.

    Examples
    --------
    >>> from modelfuse.merge.methods.workspace import Workspace
    >>> a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-3.0, -1.0, 2.0])
    >>> divisor = torch.empty(3)
    >>> agreeing_sums([a, b], [1.0, 1.0], [1.0, 1.0], a + b, torch.empty(3), divisor, Workspace(3))
    tensor([-3., -3.,  2.])
    >>> divisor
    tensor([1., 2., 1.])
    """
    length = merged.numel()
    # the tally's sign bit, set where the elected sign is -: where the tally is below 0, or
    # -0 (a sum of zeros, which agree with neither sign)
    flip = torch.bitwise_and(
        tally.view(torch.int32), _SIGN_BIT, out=workspace.get("scratch", length, torch.int32)
    )
    agree = workspace.get("agree", length)
    zero = torch.zeros((), dtype=torch.float32)
    for i, (value, scale, w) in enumerate(zip(values, scales, weights)):
        # the sign of value is the elected one: value with its sign bit flipped by the
        # tally's is above 0 (as value * (+1 or -1) > 0, in one integer pass)
        torch.bitwise_xor(value.view(torch.int32), flip, out=agree.view(torch.int32))
        torch.gt(agree, 0.0, out=agree)
        if i == 0:  # the sums start from zero (0 + x is x)
            torch.addcmul(zero, value, agree, value=scale, out=merged)
            if divisor is not None:
                torch.mul(agree, w, out=divisor)
            continue
        merged.addcmul_(value, agree, value=scale)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    return merged
