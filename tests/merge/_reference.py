"""Reference formulas for the data-free merge tests, written out with numpy (full sorts allowed)."""

from __future__ import annotations

import numpy as np


def top_k_positions(values: np.ndarray, k: int) -> np.ndarray:
    """Flat positions of the k largest values; among equal values the lower position first."""
    order = np.argsort(-values.reshape(-1), kind="stable")
    return order[: max(k, 0)]


def trim(tau: np.ndarray, density: float) -> np.ndarray:
    k = int(density * tau.size)
    out = np.zeros(tau.size, dtype=np.float64)
    keep = top_k_positions(np.abs(tau), k)
    out[keep] = tau.reshape(-1)[keep]
    return out.reshape(tau.shape)


def outliers(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = tau.size
    target, top = int(density * n), int(gamma * n)
    top = min(top, n - target)
    order = np.argsort(-np.abs(tau).reshape(-1), kind="stable")
    keep = order[top : top + target]
    out = np.zeros(n, dtype=np.float64)
    out[keep] = tau.reshape(-1)[keep]
    return out.reshape(tau.shape)


def combine(base, taus, weights, lam, normalize, consensus):
    """base + lam * (elected or plain) weighted sum, as in TIES / task arithmetic."""
    x = np.stack([w * t for w, t in zip(weights, taus)])
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    if consensus is None:
        merged = x.sum(0)
        if normalize:
            s = float(np.sum(weights))
            merged = merged / (s if abs(s) >= 1e-8 else 1.0)
    else:
        if consensus == "sum":
            elected = np.where(x.sum(0) >= 0, 1.0, -1.0)
        else:
            elected = np.where(np.sign(x).sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(x) == elected
        merged = (x * agree).sum(0)
        if normalize:
            divisor = (w * agree).sum(0)
            divisor[divisor == 0] = 1.0
            merged = merged / divisor
    return base + lam * merged


def uniforms(size, seed):
    """The documented stream: flat entries [j * 2**18, (j + 1) * 2**18) draw from numpy's
    PCG64 seeded by seed + j, two entries per 64-bit output (low half first), each the
    top 24 of its 32 bits times 2**-24."""
    parts = []
    for j, a in enumerate(range(0, size, 2**18)):
        n = min(2**18, size - a)
        raw = np.random.PCG64(seed + j).random_raw((n + 1) // 2)
        halves = np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).reshape(-1)[:n]
        parts.append(((halves >> 8) * 2.0**-24).astype(np.float32))
    return np.concatenate(parts)
