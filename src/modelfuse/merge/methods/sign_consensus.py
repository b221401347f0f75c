"""TIES' sign election and disjoint sum, chunk by chunk from running sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from modelfuse.merge.methods.sparsification import Sparsifier, Workspace

__all__ = ["ConsensusMethod", "elect_signs"]

ConsensusMethod = Literal["sum", "count"]


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
) -> torch.Tensor:
    """TIES' sign election and disjoint sum over one chunk, from running sums.

    Only float arithmetic (no bool tensors, which are slow to build): the sum
    T = sum x_i and the positive part P = sum max(x_i, 0) give the negative part
    T - P; with s_i = sign(x_i), the weight of the models voting + is
    (S2 + S1) / 2 and of those voting - is (S2 - S1) / 2, where
    S1 = sum w_i s_i and S2 = sum w_i |s_i|.
    """
    length = base_part.numel()
    positive = workspace.zeros("positive", length)
    total = workspace.zeros("total", length)
    signed = workspace.zeros("signed", length) if normalize else None
    unsigned = workspace.zeros("unsigned", length) if normalize else None
    votes = workspace.zeros("votes", length) if consensus_method == "count" else None
    scratch = workspace.get("scratch", length)
    for i, w in enumerate(weights):
        sparsifier = sparsifiers[i]
        kept = None if sparsifier is None else sparsifier.take(index.start, length)
        scale = w
        if kept is not None and sparsifier is not None:  # held by the norm pass
            scale = w * sparsifier.factor
            delta = kept if scale == 1.0 else kept.mul_(scale)
        else:
            delta = torch.sub(flats[i][index], base_part, out=workspace.get("delta", length))
            if sparsifier is not None:
                delta = sparsifier(delta, start)
                scale = w * sparsifier.factor
            if scale != 1.0:
                delta.mul_(scale)
        total.add_(delta)
        positive.add_(torch.clamp(delta, min=0, out=scratch))
        if votes is not None or (signed is not None and unsigned is not None):
            sign = torch.sign(delta, out=scratch)
            if votes is not None:
                votes.add_(sign)
            if signed is not None and unsigned is not None:
                signed.add_(sign, alpha=w)
                unsigned.add_(sign.abs_(), alpha=w)
    tally = votes if votes is not None else total
    # 1 where the tally is >= 0, else 0
    elected = torch.sign(tally, out=scratch).add_(1.0).clamp_(max=1.0)
    negative = total.sub_(positive)
    merged = torch.lerp(negative, positive, elected, out=workspace.get("merged", length))
    if signed is not None and unsigned is not None:
        # agreeing weight: (S2 - S1) / 2 + elected * S1; a zero sum counts as one
        divisor = unsigned.sub_(signed).mul_(0.5).add_(elected.mul_(signed))
        zero = torch.sign(divisor, out=positive).abs_().neg_().add_(1.0)
        merged.div_(divisor.add_(zero))
    return merged
