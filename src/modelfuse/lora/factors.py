"""The truncated SVD of one task vector: ``delta ~ B @ A`` at a fixed rank or energy."""

from __future__ import annotations

import torch

from modelfuse.errors import ConfigError

__all__ = ["check_rank_energy", "low_rank_factors"]

# above this many rows and columns a fixed-rank fit uses a randomized SVD
_LOWRANK_SIDE = 4096


def _chosen_rank(
    s: torch.Tensor, rank: int | None, energy: float | None, sv_epsilon: float = 0.0
) -> int:
    """The rank kept for singular values ``s`` (descending), at most their numerical rank."""
    # singular values below numpy's matrix_rank tolerance are rounding noise: never kept
    tolerance = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps * 4 if s.numel() else 0
    numerical = max(1, int((s > max(tolerance, sv_epsilon)).sum()))
    limit = numerical if rank is None else min(rank, numerical)
    if energy is None:
        return limit
    squares = s.to(torch.float64) ** 2
    share = torch.cumsum(squares, 0) / squares.sum()
    # the smallest k whose first k squared singular values reach the threshold
    reached = int(torch.searchsorted(share, torch.tensor([energy], dtype=torch.float64)))
    return max(1, min(limit, reached + 1))


def low_rank_factors(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``B`` (out x k) and ``A`` (k x in) with ``B @ A`` the truncated SVD of ``delta``.

    By Eckart-Young, ``B @ A`` is the best rank-k approximation of ``delta``
    in the Frobenius norm. The singular values are split evenly:
    ``B = U_k sqrt(S_k)`` and ``A = sqrt(S_k) V_k^T``.

    Parameters
    ----------
    delta : Tensor
        A 2-D matrix (not modified).
    rank : int, optional
        The rank kept (at most ``min(delta.shape)`` and the numerical rank).
    energy : float, optional
        Keep the smallest rank whose squared singular values reach this
        fraction of their sum (capped by ``rank`` when both are given).
    sv_epsilon : float, default 0
        Keep only singular values above this (mergekit-extract-lora's
        ``--sv-epsilon``), at least one.

    Returns
    -------
    (B, A) : float32 tensors

    Examples
    --------
    >>> import torch
    >>> delta = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0]))
    >>> b, a = low_rank_factors(delta, rank=1)
    >>> b.shape, a.shape, torch.allclose(b @ a, delta)
    (torch.Size([2, 1]), torch.Size([1, 3]), True)
    """
    if rank is None and energy is None:
        raise ConfigError("give a rank, an energy threshold or both; pass --rank 16 or --energy 0.9")
    matrix = delta.detach().to(torch.float32)
    side = min(matrix.shape)
    if energy is None and rank is not None and side >= _LOWRANK_SIDE and rank * 8 < side:
        u, s, v = torch.svd_lowrank(matrix, q=min(side, rank + 16), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = _chosen_rank(s, rank, energy, sv_epsilon)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).contiguous()
    a = (root[:, None] * vh[:k]).contiguous()
    return b, a


def check_rank_energy(rank: int | None, energy: float | None) -> None:
    """Refuse a missing or out-of-range ``rank``/``energy``, naming the flag."""
    if rank is None and energy is None:
        raise ConfigError("give a rank, an energy threshold or both; pass --rank 16 or --energy 0.9")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank: expected a whole number of at least 1, got {repr(rank)[:60]}")
    if energy is not None and not (isinstance(energy, float | int) and 0 < energy <= 1):
        raise ConfigError(
            f"--energy: expected a fraction in (0, 1], got {repr(energy)[:60]}; pass e.g. 0.9"
        )
