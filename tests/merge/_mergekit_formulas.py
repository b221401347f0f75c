"""What mergekit 0.1.5 computes for one tensor name, written out in numpy (float64).

Each function takes the float64 tensors of one name and the parameters already
resolved for that name (gradients and filters are resolved by :func:`layer_t`
and :func:`resolve`). The trimming functions take ``order``, the flat positions
sorted as mergekit's sort returns them, so that a test can state which of several
equal magnitudes mergekit keeps (``None``: the lower position first among equals,
as a stable sort returns them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

Order = Callable[[np.ndarray], np.ndarray] | None

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_t(name: str, n_layers: int) -> float:
    """Position of a tensor for a gradient: i / (n - 1) in layer i, 0 outside the layers."""
    match = _LAYER.search(name)
    if match is None:
        return 0.0
    return int(match.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def resolve(setting, name: str, n_layers: int) -> float:
    """A scalar, a gradient (list of numbers) or a list of name filters, read for ``name``."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for item in setting:
            if "filter" not in item or item["filter"] in name:
                return resolve(item["value"], name, n_layers)
        raise KeyError(name)
    if isinstance(setting, list):
        values = np.asarray(setting, dtype=np.float64)
        if len(values) == 1:
            return float(values[0])
        grid = np.linspace(0.0, 1.0, len(values))
        return float(np.interp(layer_t(name, n_layers), grid, values))
    return float(setting)


def descending(magnitudes: np.ndarray) -> np.ndarray:
    """Positions by decreasing magnitude, the lower position first among equals."""
    return np.argsort(-magnitudes, kind="stable")


def ascending(magnitudes: np.ndarray) -> np.ndarray:
    """Positions by increasing magnitude, the lower position first among equals."""
    return np.argsort(magnitudes, kind="stable")


def l1_rescale(tau: np.ndarray, kept: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: kept * |tau|_1 / |kept|_1."""
    before, after = np.abs(tau).sum(), np.abs(kept).sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(tau: np.ndarray, density: float, rescale: bool, order: Order = None) -> np.ndarray:
    """TIES trim: keep the max(1, int(density n)) largest magnitudes (nothing at density 0)."""
    if density >= 1:
        return tau
    if density <= 0:
        return np.zeros_like(tau)
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.size))
    positions = (order or descending)(np.abs(flat))[:k]
    mask = np.zeros(flat.size)
    mask[positions] = 1.0
    kept = (flat * mask).reshape(tau.shape)
    return l1_rescale(tau, kept) if rescale else kept


def magnitude_outliers(
    tau: np.ndarray, density: float, gamma: float, rescale: bool, order: Order = None
) -> np.ndarray:
    """Breadcrumbs trim: sort ascending, skip the n - int(density n) - int(gamma n) smallest
    (at least 0), keep the next int(density n)."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    positions = (order or ascending)(np.abs(flat))[bottom : bottom + target]
    mask = np.zeros(n)
    mask[positions] = 1.0
    kept = (flat * mask).reshape(tau.shape)
    return l1_rescale(tau, kept) if rescale else kept


def task_arithmetic_family(
    base: np.ndarray,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool,
    consensus: bool,
    sparsify: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> np.ndarray:
    """``GeneralizedTaskArithmeticMerge.merge_group``: sparsify each task vector (``sparsify(tau,
    i)``), weight, elect the sign of the sum (zero counts as +) and keep the agreeing entries,
    divide by the agreeing weights (or all weights; a zero sum counts as 1), scale by lambda."""
    deltas = []
    for i, tensor in enumerate(tensors):
        tau = tensor - base
        deltas.append(sparsify(tau, i) if sparsify is not None else tau)
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    x = np.stack(deltas) * w
    if consensus:
        elected = np.where(x.sum(0) >= 0, 1.0, -1.0)
        agree = (np.sign(x) == elected).astype(np.float64)
        mixed = (x * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = x.sum(0)
        divisor = w.sum(0) * np.ones_like(mixed)
        divisor[np.abs(divisor) < 1e-8] = 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def linear(tensors: Sequence[np.ndarray], weights: Sequence[float], normalize: bool) -> np.ndarray:
    out = sum(w * t for w, t in zip(weights, tensors))
    return out / float(np.sum(weights)) if normalize else out


def slerp(a: np.ndarray, b: np.ndarray, t: float, threshold: float = 0.9995) -> np.ndarray:
    """The base ``a`` to ``b`` over the whole tensor; linear when |cos| > threshold."""
    eps = 1e-8
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(np.clip(np.sum((a / na) * (b / nb)), -1.0, 1.0))
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def model_stock(base: np.ndarray, tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Mean pairwise cosine of the task vectors; t = N cos / (1 + (N - 1) cos)."""
    offsets = [(t - base).reshape(-1) for t in tensors]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6)
            cosines.append(np.clip(a @ b / norms, -1.0, 1.0))
    cos = float(np.mean(cosines))
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    return t * (sum(tensors) / n) + (1 - t) * base


def multislerp(
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    base: np.ndarray | None = None,
    normalize_weights: bool = True,
) -> np.ndarray:
    """Weighted mean of the unit vectors, tangent-space average, exponential map back, times
    the weighted mean norm (all relative to ``base`` when given)."""
    eps = 1e-8
    if len(tensors) == 1:
        return tensors[0]
    x = np.stack([t - base if base is not None else t for t in tensors])
    flat = x.reshape(len(tensors), -1)
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = unit - (unit @ mean)[:, None] * mean
    tangent = (tangent * w[:, None]).sum(0)
    size = np.linalg.norm(tangent) + eps
    result = (mean * np.cos(size) + tangent * (np.sin(size) / size)) * float(norms[:, 0] @ w)
    result = result.reshape(x.shape[1:])
    return result + base if base is not None else result


def bfloat16_step(values: np.ndarray) -> np.ndarray:
    """One bfloat16 rounding step at each value: 2^(e - 7) for |v| in [2^e, 2^(e+1))."""
    magnitude = np.maximum(np.abs(values), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(magnitude)) - 7)


def tie_bound(magnitudes: np.ndarray, kept: np.ndarray) -> int:
    """How many entries two selections of the same counts per magnitude can disagree on.

    For each magnitude v that the selection ``kept`` takes only partly (q_v of the e_v entries
    equal to v), another selection keeping q_v of them as well differs on at most
    2 min(q_v, e_v - q_v) positions; magnitudes kept wholly or not at all add nothing.
    """
    flat, kept = magnitudes.reshape(-1), kept.reshape(-1)
    total = 0
    for value in np.unique(flat[kept]):
        equal = flat == value
        e, q = int(equal.sum()), int((equal & kept).sum())
        total += 2 * min(q, e - q)
    return total


def arcee_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Importance |x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) per row (last
    dimension), threshold median + 1.5 (q3 - q1) with quantile q the sorted entry
    int(q (n - 1)) (exact below 1M entries), result b + (x - b) [importance >= threshold]."""
    rows = (-1, base.shape[-1]) if base.ndim else (1, 1)
    mx, mb = other.reshape(rows), base.reshape(rows)

    def softmax(m: np.ndarray) -> np.ndarray:
        e = np.exp(m - m.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(mx) + 1e-8, softmax(mb) + 1e-8
    importance = np.abs(mx - mb) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(importance.reshape(-1))
    n = s.size
    q1, median, q3 = s[int(0.25 * (n - 1))], s[int(0.5 * (n - 1))], s[int(0.75 * (n - 1))]
    mask = (importance >= median + 1.5 * (q3 - q1)).reshape(base.shape)
    return base + (other - base) * mask


def ram(
    base: np.ndarray,
    tensors: Sequence[np.ndarray],
    epsilon: float = 1e-5,
    tensor_local: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
) -> np.ndarray:
    """``ram`` / ``ramplus_tl``: masks |tau| > epsilon, counts c; unique entries (c = 1)
    whole (times 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha) for ramplus_tl,
    counted over the whole tensor), shared ones (c > 1) divided by c."""
    taus = np.stack([t - base for t in tensors])
    masks = np.abs(taus) > epsilon
    counts = masks.sum(0)
    unique, shared = counts == 1, counts > 1
    merged = np.zeros_like(base)
    for tau, mask in zip(taus, masks):
        lam = 1.0
        if tensor_local:
            rho = (mask & shared).sum() / max((mask & unique).sum(), epsilon)
            lam = 1 + r * float(np.clip(rho, 0, alpha))
        merged = merged + tau * mask * unique * lam + tau * mask * shared / np.maximum(counts, 1)
    return base + merged
