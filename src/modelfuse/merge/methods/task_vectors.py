r"""Task vectors: the one implementation behind task arithmetic, TIES, DARE and breadcrumbs.

Every method of the family is a setting of :func:`generalized_task_arithmetic`:

1. task vectors :math:`\tau_i = \theta_i - \theta_b`;
2. sparsify each :math:`\tau_i` (``sparsification``): keep the ``density``
   fraction of largest magnitudes (TIES), a Bernoulli sample of entries (DARE),
   or drop the top ``gamma`` and the bottom ``1 - density - gamma`` by magnitude
   (breadcrumbs), or a Bernoulli sample whose keep probabilities rise with each
   entry's magnitude rank in its row (DELLA's ``"della_magprune"``); optionally
   rescale what is kept;
3. weight: :math:`x_i = w_i \hat\tau_i`;
4. combine: the sum :math:`\sum_i x_i`, or with ``consensus_method`` a sign
   election :math:`\gamma = \operatorname{sign}(\sum_i x_i)` (``"sum"``) or
   :math:`\operatorname{sign}(\sum_i \operatorname{sign} x_i)` (``"count"``), ties
   to +, and only the entries agreeing with :math:`\gamma` are summed;
5. ``normalize``: divide by the sum of the weights of the models that
   contributed (all of them without election; a zero sum counts as one);
6. :math:`\theta = \theta_b + \lambda \tau_m`.

Each tensor is processed in chunks of 2**18 entries: for every chunk the models
are visited one at a time and only running sums are kept, so the temporaries
are a few chunks whatever the tensor's size or the number of models (the
magnitude thresholds are found first, exactly, by a selection that reads the
task vector chunk by chunk; see :mod:`modelfuse.merge.methods.magnitude_selection`).

Every step is elementwise once each tensor's magnitude selections are known,
so the engine merges large tensors in blocks of rows: :func:`tensor_selections`
computes them from the whole tensor first (its reduction) and each block gets
them with its ``offset``. DARE's random drops are elementwise by construction:
the draws of flat entry ``e`` of model ``i`` come from a generator seeded by
``s_i + e // RANDOM_CHUNK`` (``s_i`` drawn from the tensor's generator), so any
block of entries finds its own draws without generating the ones before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.magnitude_selection import (
    MagnitudeThreshold,
    TensorSelection,
    kept_count,
    sample_stride,
    select_top_k,
    select_top_ks,
)
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = [
    "ConsensusMethod",
    "DELLA_ONE_ENTRY",
    "RANDOM_CHUNK",
    "RescaleFactors",
    "RescaleMethod",
    "SparsifyingParameters",
    "Sparsification",
    "TaskVectorParameters",
    "della_groups",
    "della_probabilities",
    "elementwise_rescale",
    "generalized_task_arithmetic",
    "rescale_factors",
    "sparsify",
    "tensor_selections",
    "uniform_draws",
]

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
ConsensusMethod = Literal["sum", "count"]
RescaleMethod = Literal["exact", "l1", "l2", "linf"]

_NORM_EPS = 1e-7


class TaskVectorParameters(MethodParameters):
    """Parameters shared by every task-vector method."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0,
        description="weight w_i of the model's task vector; negative removes a skill "
        "(mergekit requires it; modelfuse defaults to 1)",
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale of the combined task vector, applied last"
    )
    normalize: bool = Field(
        False, description="divide the combined task vector by the sum of the weights"
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit configurations (a memory option there); "
        "no effect on the result",
    )


class SparsifyingParameters(TaskVectorParameters):
    """Parameters of the task-vector methods that sparsify each task vector."""

    density: Annotated[float, PER_MODEL] = Field(
        1.0, ge=0.0, le=1.0, description="fraction of each task vector's entries kept"
    )
    rescale: bool = Field(False, description="rescale the kept entries (see rescale_method)")
    rescale_method: RescaleMethod = Field(
        "l1",
        description="'l1' (as mergekit): multiply the kept entries so that each tensor's task "
        "vector keeps its L1 norm ('l2', 'linf': those norms); 'exact': divide them by "
        "density (DARE's 1/(1-p))",
    )


_CHUNK = 1 << 18
"""Entries merged at once: the work of a tensor runs chunk by chunk, so temporaries stay small."""

_SAMPLE = 1 << 16

RANDOM_CHUNK = 1 << 18
"""Flat entries drawing from one generator in DARE's drop masks (see :func:`uniform_draws`)."""

DELLA_ONE_ENTRY = 0.5
"""The rank position given to an entry ranked alone (a row of one entry): its keep
probability is then ``density`` (mergekit 0.1.5 divides 0 by 0 there and fails)."""


def della_groups(shape: Sequence[int]) -> tuple[int, int]:
    """``(length, stride)`` of the groups within which DELLA ranks magnitudes.

    As mergekit's ``della_magprune``: along the second dimension (each row of a
    matrix; for more dimensions, each ``tensor[i, :, j, ...]``), or the whole
    tensor when it has fewer than two dimensions. In the flat layout a group's
    entries are ``stride`` apart and ``length * stride`` entries hold whole groups.

    Examples
    --------
    >>> della_groups((4, 6)), della_groups((10,)), della_groups((2, 3, 5))
    ((6, 1), (10, 1), (3, 5))
    """
    if len(shape) < 2:
        n = 1
        for size in shape:
            n *= int(size)
        return n, 1
    stride = 1
    for size in shape[2:]:
        stride *= int(size)
    return int(shape[1]), stride


def della_probabilities(
    magnitudes: torch.Tensor, density: float, epsilon: float, groups: tuple[int, int]
) -> torch.Tensor:
    r"""DELLA's keep probabilities: linear in each entry's magnitude rank within its group.

    In a group of :math:`m` entries, the entry of rank :math:`r` (0 for the
    smallest magnitude; equal magnitudes ranked by position) is kept with
    probability :math:`p = (d - \epsilon) + 2\epsilon\, r / (m - 1)`, from
    :math:`d - \epsilon` to :math:`d + \epsilon` (:data:`DELLA_ONE_ENTRY` in
    place of :math:`r / (m - 1)` when :math:`m = 1`), in float32 as mergekit
    0.1.5 computes them. ``magnitudes`` holds whole groups (a multiple of
    ``length * stride`` flat entries, see :func:`della_groups`). Returns a new
    float32 tensor of the same shape.

    Examples
    --------
    >>> della_probabilities(torch.tensor([3.0, 1.0, 2.0]), 0.5, 0.1, (3, 1))
    tensor([0.6000, 0.4000, 0.5000])
    """
    length, stride = groups
    view = magnitudes.reshape(-1, length, stride)
    if length == 1:
        position = torch.full(view.shape, DELLA_ONE_ENTRY, dtype=torch.float32)
    else:
        order = torch.argsort(view, dim=1, stable=True)
        # the rank of entry order[j] is j: scattered back, not sorted again
        ranks = torch.arange(length, dtype=torch.float32).div_(length - 1).view(1, -1, 1)
        position = torch.empty(view.shape, dtype=torch.float32)
        position.scatter_(1, order, ranks.expand(view.shape))
    probabilities = position.mul_(2).mul_(epsilon).add_(density - epsilon)
    return probabilities.reshape(magnitudes.shape)


def _chunk_size(sparsification: str, groups: tuple[int, int], size: int) -> int:
    """Entries merged at once: about :data:`_CHUNK` of them, or the whole tensor.

    DELLA's chunks hold whole groups and a multiple of 8 entries (for the
    packed drop masks); the other sparsifications' chunks any entries.
    """
    if sparsification != "della_magprune":
        return max(1, min(_CHUNK, size))
    whole = groups[0] * groups[1]
    unit = max(1, whole * 8 // math.gcd(whole, 8))
    return max(1, min(size, max(1, _CHUNK // unit) * unit))


def uniform_draws(seed: int, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` with the uniform draws of flat entries ``start ...`` of a stream.

    Entry ``e`` of the stream is draw ``e % RANDOM_CHUNK`` of a generator seeded
    by ``seed + e // RANDOM_CHUNK``, so any block of entries is found without
    drawing the ones before it, and the stream does not depend on how a tensor
    is split.

    Examples
    --------
    >>> whole = uniform_draws(7, 0, torch.empty(10))
    >>> torch.equal(uniform_draws(7, 4, torch.empty(6)), whole[4:])
    True
    """
    flat = out.reshape(-1)
    length, done = flat.numel(), 0
    while done < length:
        chunk, position = divmod(start + done, RANDOM_CHUNK)
        take = min(length - done, RANDOM_CHUNK - position)
        generator = torch.Generator().manual_seed(seed + chunk)
        if position == 0:
            torch.rand(take, generator=generator, out=flat[done : done + take])
        else:
            flat[done : done + take] = torch.rand(position + take, generator=generator)[position:]
        done += take
    return out


def elementwise_rescale(parameters: Mapping[str, Any]) -> bool:
    """Whether a tensor's resolved parameters rescale kept entries elementwise (``"exact"``,
    or no rescale), so that a block of it merges alone; a norm rescale needs the whole
    tensor's norms (:func:`rescale_factors`)."""
    return not parameters.get("rescale", False) or parameters.get("rescale_method") == "exact"


class _NormSum:
    """A norm accumulated chunk by chunk, the same whatever the torch thread count.

    Chunk sums are numpy's pairwise float64 sums (single-threaded): a tensor's
    norm is the same number whether its merge runs whole or as the engine's
    reduction before its row blocks.
    """

    def __init__(self, method: RescaleMethod) -> None:
        if method not in ("l1", "l2", "linf"):
            raise ConfigError(
                f"rescale_method: unknown value {method!r}; valid: exact, l1, l2, linf"
            )
        self.method = method
        self.total = 0.0

    def add(self, values: torch.Tensor, scratch: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        magnitudes = torch.abs(values.reshape(-1), out=scratch).numpy()
        if self.method == "l1":
            self.total += float(np.sum(magnitudes, dtype=np.float64))
        elif self.method == "l2":
            wide = magnitudes.astype(np.float64)
            self.total += float(np.sum(wide * wide))
        else:
            self.total = max(self.total, float(magnitudes.max()))

    def value(self) -> float:
        return float(np.sqrt(self.total)) if self.method == "l2" else self.total


class _Workspace:
    """Chunk-sized buffers reused from chunk to chunk.

    Few, reused allocations keep the allocator's heap small: freed chunk-sized
    temporaries interleaved with the engine's large tensors fragment it.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < length:
            buffer = torch.empty(max(self.size, length), dtype=dtype)
            self._buffers[key] = buffer
        return buffer[:length]

    def zeros(self, key: str, length: int) -> torch.Tensor:
        return self.get(key, length).zero_()


class _Sparsifier:
    """One model's sparsification of one tensor, prepared once, then applied chunk by chunk.

    ``delta_of(index, out)`` writes the task vector's entries at a slice of the
    flattened tensor into ``out`` (a new tensor when ``out`` is None) and returns
    it; the chunks must then come in index order (:meth:`restart` starts again).

    :attr:`factor` multiplies what is kept: ``1 / density`` for the ``"exact"``
    rescale, the whole tensor's norm ratio for a norm rescale once
    :func:`_set_norm_factors` has run (or given by the engine's reduction), else 1.
    """

    def __init__(
        self,
        delta_of: Callable[[slice, torch.Tensor | None], torch.Tensor],
        n: int,
        *,
        method: Sparsification,
        density: float,
        gamma: float,
        rescale: bool,
        rescale_method: RescaleMethod,
        seed: int,
        threshold: MagnitudeThreshold | None,
        name: str,
        chunk: int,
        workspace: _Workspace,
        selections: Sequence[TensorSelection] | None = None,
        offset: int = 0,
        epsilon: float = 0.0,
        groups: tuple[int, int] = (1, 1),
    ) -> None:
        if method not in ("magnitude", "random", "magnitude_outliers", "della_magprune"):
            raise ConfigError(
                f"sparsification: unknown method {method!r}; valid: magnitude, random, "
                "magnitude_outliers, della_magprune"
            )
        if method == "della_magprune" and 0 < density < 1:
            if not (0 < density - epsilon < 1 and 0 < density + epsilon < 1):
                raise ConfigError(
                    f"epsilon: {epsilon:g} with density {density:g} gives keep probabilities "
                    f"from {density - epsilon:g} to {density + epsilon:g}; choose epsilon so "
                    "that density - epsilon and density + epsilon are in (0, 1)"
                )
        if rescale_method not in ("exact", "l1", "l2", "linf"):
            raise ConfigError(
                f"rescale_method: unknown value {rescale_method!r}; valid: exact, l1, l2, linf"
            )
        self.method = method
        self.size = n
        self.density = float(density)
        self.epsilon = float(epsilon)
        self.groups = groups
        self.seed = int(seed)
        self.keep_all = density >= 1 and (threshold is None or method != "magnitude")
        rescaling = rescale and density < 1
        # DELLA's exact rescale divides each kept entry by its own keep probability
        self.per_entry = rescaling and rescale_method == "exact" and method == "della_magprune"
        self.factor = (
            1.0 / density
            if rescaling and rescale_method == "exact" and density > 0 and not self.per_entry
            else 1.0
        )
        self.norm: RescaleMethod | None = (
            rescale_method if rescaling and rescale_method != "exact" else None
        )
        self.workspace = workspace
        self.selectors: list[Callable[..., torch.Tensor]] = []
        self.thresholds: list[MagnitudeThreshold] = []
        self._global: tuple[MagnitudeThreshold, str] | None = None
        # DARE's keep mask of the whole tensor, one bit per flat entry (numpy packbits),
        # recorded by the norm pass so that the merge pass need not draw it again
        self.mask: np.ndarray | None = None
        self.recording = False
        if self.keep_all or method in ("random", "della_magprune"):
            return

        def magnitudes() -> Iterator[torch.Tensor]:
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                yield delta_of(slice(start, stop), workspace.get("magnitudes", stop - start)).abs_()

        if selections is not None:  # the whole tensor's, this being a block of it at offset
            self.thresholds = [sel.within(offset, n, magnitudes) for sel in selections]
            self.selectors = [t.selector() for t in self.thresholds]
            return

        sample = None
        if n > 2 * _SAMPLE:
            sample = delta_of(slice(None, None, sample_stride(n)), None).abs_()
        if method == "magnitude":
            if threshold is not None:
                self._global = (threshold, name)
                self.selectors = [threshold.selector(name)]
            else:
                self.thresholds = [select_top_k(magnitudes, kept_count(density, n), n, sample)]
                self.selectors = [self.thresholds[0].selector()]
            return
        target, top = int(density * n), int(gamma * n)
        top = min(top, n - target)
        kept, dropped = select_top_ks(magnitudes, [top + target, top], n, sample)
        self.thresholds = [kept] if top <= 0 else [kept, dropped]
        self.selectors = [t.selector() for t in self.thresholds]

    def _record(self, keep: torch.Tensor, start: int) -> None:
        if self.mask is None:
            self.mask = np.zeros((self.size + 7) // 8, dtype=np.uint8)
        if start % 8:
            raise RuntimeError(f"drop masks are recorded from chunks at multiples of 8, not {start}")
        bits = np.packbits(keep.reshape(-1).to(torch.uint8).numpy())
        self.mask[start // 8 : start // 8 + bits.size] = bits

    def restart(self) -> None:
        """Start again from the first chunk (the magnitude selectors count ties as they go)."""
        if self._global is not None:
            self.selectors = [self._global[0].selector(self._global[1])]
        else:
            self.selectors = [t.selector() for t in self.thresholds]

    def __call__(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Sparsify the next chunk (``delta`` may be reused), at flat index ``start``
        of the whole tensor; returns it.

        The rescale is left to the caller (multiply by :attr:`factor`), which
        folds it into the model's weight.
        """
        if self.keep_all:
            return delta
        length = delta.numel()
        if self.method in ("random", "della_magprune"):
            buffer = self.workspace.get("random", length).view(delta.shape)
            if self.mask is not None and not self.recording:
                keep = _unpack(self.mask, start, buffer)
            elif self.method == "random" or self.density <= 0:
                # floor(u + d) is 1 with probability d for u ~ U[0, 1): the kept entries.
                keep = uniform_draws(self.seed, start, buffer).add_(self.density).floor_()
            else:
                p = della_probabilities(delta.abs(), self.density, self.epsilon, self.groups)
                keep = uniform_draws(self.seed, start, buffer).add_(p).floor_()
                if self.per_entry:
                    keep.div_(p)
            if self.recording:
                self._record(keep, start)
            kept = delta.mul_(keep)
        else:
            kept = self.selectors[0](delta, out=self.workspace.get("kept", length))
            if len(self.selectors) > 1:
                # the largest ones, dropped again
                kept.sub_(self.selectors[1](delta, out=self.workspace.get("top", length)))
        return kept


def _unpack(mask: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
    """Entries ``start ... start + out.numel()`` of a packed 0/1 mask, as floats in ``out``."""
    length = out.numel()
    first = start // 8
    bits = np.unpackbits(mask[first : (start + length + 7) // 8])
    skip = start - 8 * first
    return out.copy_(torch.from_numpy(bits[skip : skip + length]).view(out.shape))


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


def _set_norm_factors(
    sparsifiers: Sequence[_Sparsifier | None],
    deltas: Sequence[Callable[[slice, torch.Tensor | None], torch.Tensor]],
    size: int,
    chunk: int,
    workspace: _Workspace,
) -> list[float]:
    """Each norm-rescaling sparsifier's factor over the whole tensor, set on it and returned.

    As mergekit's ``rescale``: the norm of the task vector before the drop over
    the norm of what is kept, or 1 when either is below 1e-7. One pass over
    the tensor per such model, chunk by chunk from flat index 0 (so the result
    is the same for the whole merge and the engine's reduction).
    """
    factors = []
    for sparsifier, delta_of in zip(sparsifiers, deltas):
        if sparsifier is None or sparsifier.norm is None:
            factors.append(1.0 if sparsifier is None else sparsifier.factor)
            continue
        before, after = _NormSum(sparsifier.norm), _NormSum(sparsifier.norm)
        sparsifier.recording = sparsifier.method in ("random", "della_magprune")
        for index in _chunks(size, chunk, 0):
            length = index.stop - index.start
            scratch = workspace.get("norm", length)
            delta = delta_of(index, workspace.get("delta", length))
            before.add(delta, scratch)
            after.add(sparsifier(delta, index.start), scratch)
        sparsifier.recording = False
        sparsifier.restart()
        ratio = 1.0
        if before.value() >= _NORM_EPS and after.value() >= _NORM_EPS:
            ratio = before.value() / after.value()
        sparsifier.factor = ratio
        factors.append(ratio)
    return factors


def sparsify(
    delta: torch.Tensor,
    *,
    method: Sparsification,
    density: float,
    gamma: float = 0.0,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    threshold: MagnitudeThreshold | None = None,
    name: str = "",
    epsilon: float = 0.0,
) -> torch.Tensor:
    r"""Sparsify one task vector; returns a new tensor.

    The whole-tensor form of the sparsification step of
    :func:`generalized_task_arithmetic` (which applies it chunk by chunk).

    Parameters
    ----------
    delta : Tensor
        The task vector. Not modified.
    method : {"magnitude", "random", "magnitude_outliers", "della_magprune"}
        ``"magnitude"`` keeps the ``k = max(1, int(density * n))`` entries of
        largest magnitude (none when ``density`` is 0; ties go to the lower
        index; see :func:`~modelfuse.merge.methods.magnitude_selection.kept_count`); ``"random"`` keeps each entry with probability
        ``density`` (DARE); ``"magnitude_outliers"`` drops the ``int(gamma * n)``
        largest and keeps the next ``int(density * n)`` (breadcrumbs; fewer large
        ones are dropped if both do not fit). These are mergekit 0.1.5's counts.
        ``"della_magprune"`` keeps each entry with its own probability, from
        ``density - epsilon`` to ``density + epsilon`` by magnitude rank in its
        row (:func:`della_probabilities`), with ``"exact"`` dividing each kept
        entry by its probability.
    density : float
        Fraction kept, in [0, 1]. ``density >= 1`` keeps everything, unscaled.
    gamma : float, default 0
        Fraction of largest magnitudes dropped (``"magnitude_outliers"``).
    rescale : bool, default False
        Rescale what is kept (only when ``density < 1``).
    rescale_method : {"exact", "l1", "l2", "linf"}, default "exact"
        ``"exact"`` divides by ``density`` (for DARE, exactly :math:`1/(1-p)`);
        ``"l1"`` (mergekit's ``rescale``), ``"l2"`` and ``"linf"`` multiply what
        is kept by :math:`\|\tau\| / \|\hat\tau\|`, the norm before the drop over
        the norm after it, unless either is below 1e-7.
    generator : torch.Generator, optional
        Random numbers for ``"random"``: a seed ``s`` is drawn from it
        (``torch.randint(0, 2**62, (1,))``) and the draws are
        :func:`uniform_draws` of ``s``.
    threshold : MagnitudeThreshold, optional
        A whole-model selection (TIES ``scope="global"``) used instead of the
        per-tensor one for ``"magnitude"``.
    name : str
        The tensor's name, for ``threshold``.
    epsilon : float, default 0
        Half the spread of DELLA's keep probabilities (``"della_magprune"``).

    Examples
    --------
    >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), method="magnitude", density=0.5)
    tensor([ 0., -3.,  2.,  0.])
    >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), method="magnitude", density=0.5,
    ...          rescale=True, rescale_method="l1")  # L1 norm 5.6 kept: times 5.6 / 5
    tensor([ 0.0000, -3.3600,  2.2400,  0.0000])
    """
    flat = delta.to(torch.float32).reshape(-1)
    n = flat.numel()
    random = method in ("random", "della_magprune")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if random else 0
    sparsifier = _Sparsifier(
        lambda index, out: flat[index].clone() if out is None else out.copy_(flat[index]),
        n,
        method=method,
        density=density,
        gamma=gamma,
        rescale=rescale,
        rescale_method=rescale_method,
        seed=seed,
        threshold=threshold,
        name=name,
        chunk=max(n, 1),
        workspace=_Workspace(n),
        epsilon=epsilon,
        groups=della_groups(delta.shape),
    )
    if sparsifier.norm is not None:
        _set_norm_factors(
            [sparsifier],
            [lambda index, out: out.copy_(flat[index])],
            n,
            max(n, 1),
            sparsifier.workspace,
        )
    kept = sparsifier(flat.clone())
    if sparsifier.factor != 1.0:
        kept.mul_(sparsifier.factor)
    return kept.reshape(delta.shape)


def _weights(weight: Sequence[float] | None, n: int, method: str) -> list[float]:
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(
            f"{method}: {len(weights)} weights for {n} models; give one weight per model"
        )
    return weights


def _per_model(
    values: Sequence[float] | float | None, default: float, n: int, key: str, method: str
) -> list[float]:
    if values is None:
        return [default] * n
    if isinstance(values, (int, float)):
        return [float(values)] * n
    out = [float(v) for v in values]
    if len(out) != n:
        raise ConfigError(
            f"{method}: {len(out)} values of {key} for {n} models; give one per model"
        )
    return out


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsification: Sparsification | None = None,
    consensus_method: ConsensusMethod | None = None,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    magnitude_thresholds: Sequence[MagnitudeThreshold] | None = None,
    selections: Sequence[Sequence[TensorSelection]] | None = None,
    rescale_factors: RescaleFactors | Sequence[float] | None = None,
    offset: int = 0,
    name: str = "",
    method: str = "task-vector merge",
) -> torch.Tensor:
    r"""Merge task vectors: sparsify, weight, elect signs, normalize, scale, add to the base.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density, gamma, epsilon : float or sequence of float, optional
        Per-model sparsification settings (see :func:`sparsify`).
    lambda_ : float, default 1.0
        Scale of the combined task vector, applied after ``normalize``.
    normalize : bool, default False
        Divide by the sum of the weights of the contributing models.
    sparsification : {"magnitude", "random", "magnitude_outliers", "della_magprune"}, optional
        How each task vector is sparsified; None keeps it whole.
    consensus_method : {"sum", "count"}, optional
        Sign election (TIES); None sums every task vector.
    rescale, rescale_method
        See :func:`sparsify`.
    generator : torch.Generator, optional
        Random numbers for ``sparsification="random"``: one seed :math:`s_i`
        per model is drawn from it (``torch.randint(0, 2**62, (N,))``) and
        model i's draws are :func:`uniform_draws` of :math:`s_i` (one per flat
        entry of the whole tensor).
    magnitude_thresholds : sequence of MagnitudeThreshold, optional
        Whole-model selections, one per model, for ``"magnitude"``.
    selections : sequence of sequence of TensorSelection, optional
        :func:`tensor_selections` of the whole tensor, when the inputs are a
        block of it (the engine's row blocks); found from the inputs when not
        given.
    rescale_factors : RescaleFactors or sequence of float, optional
        :func:`rescale_factors` of the whole tensor (a norm rescale), when the
        inputs are a block of it; found from the inputs when not given. Their
        drop masks, when present, are applied instead of drawing them again.
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor (for
        ``selections`` and the random draws).
    name : str
        The tensor's name (used with ``magnitude_thresholds``).
    method : str
        The method's name for error messages.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
    Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023.
    Yu et al., "Language models are Super Mario: absorbing abilities from homologous
    models as a free lunch", ICML 2024.
    Davari and Belilovsky, "Model breadcrumbs: scaling multi-task model merging with
    sparse masks", ECCV 2024.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, -1.0, 1.0])
    >>> generalized_task_arithmetic([a, b], base, consensus_method="sum", normalize=True)
    tensor([ 1.0000, -1.5000,  2.0000])
    """
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    n = len(tensors)
    if n == 0:
        raise ConfigError(f"{method}: no models besides the base; give at least one")
    weights = _weights(weight, n, method)
    if magnitude_thresholds is not None and len(magnitude_thresholds) != n:
        raise ConfigError(
            f"{method}: {len(magnitude_thresholds)} magnitude thresholds for {n} models"
        )
    if selections is not None and len(selections) != n:
        raise ConfigError(f"{method}: {len(selections)} tensor selections for {n} models")
    if rescale_factors is not None and len(rescale_factors) != n:
        raise ConfigError(f"{method}: {len(rescale_factors)} rescale factors for {n} models")
    if consensus_method is not None and consensus_method not in ("sum", "count"):
        raise ConfigError(
            f"consensus_method: unknown value {consensus_method!r}; valid: sum, count"
        )
    # Inputs stay in their dtype (a bfloat16 tensor is never copied whole); each chunk
    # of the base is converted to float32, so every difference is computed in float32.
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    size = base_flat.numel()
    groups = della_groups(base.shape)
    chunk = _chunk_size(sparsification, groups, size)
    workspace = _Workspace(chunk)
    sparsifiers, deltas = _sparsifiers(
        flats,
        base_flat,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        groups=groups,
        sparsification=sparsification,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=generator,
        magnitude_thresholds=magnitude_thresholds,
        selections=selections,
        offset=offset,
        name=name,
        chunk=chunk,
        workspace=workspace,
        method=method,
    )
    if any(s is not None and s.norm is not None for s in sparsifiers):
        if rescale_factors is None:
            _set_norm_factors(sparsifiers, deltas, size, chunk, workspace)
        else:
            given = (
                rescale_factors
                if isinstance(rescale_factors, RescaleFactors)
                else RescaleFactors(tuple(rescale_factors), (None,) * n)
            )
            for sparsifier, factor, mask in zip(sparsifiers, given.factors, given.masks):
                if sparsifier is not None and sparsifier.norm is not None:
                    sparsifier.factor = float(factor)
                    sparsifier.mask = mask
    scale = float(lambda_)
    if consensus_method is None and normalize:
        divisor = sum(weights)
        scale /= divisor if abs(divisor) >= 1e-8 else 1.0
    out = torch.empty(size, dtype=torch.float32)
    for index in _chunks(size, chunk, offset):
        base_part = base_flat[index].to(torch.float32)
        length = base_part.numel()
        start = offset + index.start
        if consensus_method is None:
            merged = workspace.zeros("merged", length)
            for i in range(n):
                delta = torch.sub(flats[i][index], base_part, out=workspace.get("delta", length))
                sparsifier = sparsifiers[i]
                if sparsifier is not None:
                    delta = sparsifier(delta, start)
                    merged.add_(delta, alpha=weights[i] * sparsifier.factor)
                else:
                    merged.add_(delta, alpha=weights[i])
        else:
            merged = _elect(
                flats,
                base_part,
                index,
                start,
                sparsifiers,
                weights,
                consensus_method,
                normalize,
                workspace,
            )
        torch.add(base_part, merged, alpha=scale, out=out[index])
    return out.reshape(base.shape)


def _sparsifiers(
    flats: Sequence[torch.Tensor],
    base_flat: torch.Tensor,
    *,
    density: Sequence[float] | float | None,
    gamma: Sequence[float] | float | None,
    epsilon: Sequence[float] | float | None,
    groups: tuple[int, int],
    sparsification: Sparsification | None,
    rescale: bool,
    rescale_method: RescaleMethod,
    generator: torch.Generator | None,
    magnitude_thresholds: Sequence[MagnitudeThreshold] | None,
    selections: Sequence[Sequence[TensorSelection]] | None,
    offset: int,
    name: str,
    chunk: int,
    workspace: _Workspace,
    method: str,
) -> tuple[list[_Sparsifier | None], list[Callable[[slice, torch.Tensor | None], torch.Tensor]]]:
    """Each model's sparsifier (None without ``sparsification``) and task-vector reader."""
    n = len(flats)
    size = base_flat.numel()
    densities = _per_model(density, 1.0, n, "density", method)
    gammas = _per_model(gamma, 0.0, n, "gamma", method)
    epsilons = _per_model(epsilon, 0.0, n, "epsilon", method)
    deltas: list[Callable[[slice, torch.Tensor | None], torch.Tensor]] = [
        lambda index, out, flat=flat: torch.sub(
            flat[index], base_flat[index].to(torch.float32), out=out
        )
        for flat in flats
    ]
    sparsifiers: list[_Sparsifier | None] = [None] * n
    if sparsification is None:
        return sparsifiers, deltas
    # One generator per model, seeded from ``generator``: each model's draws are
    # one stream, whatever the chunking.
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    for i in range(n):
        sparsifiers[i] = _Sparsifier(
            deltas[i],
            size,
            method=sparsification,
            density=densities[i],
            gamma=gammas[i],
            rescale=rescale,
            rescale_method=rescale_method,
            seed=int(seeds[i]),
            threshold=None if magnitude_thresholds is None else magnitude_thresholds[i],
            name=name,
            chunk=chunk,
            workspace=workspace,
            selections=None if selections is None else selections[i],
            offset=offset,
            epsilon=epsilons[i],
            groups=groups,
        )
    return sparsifiers, deltas


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
    chunk = _chunk_size(sparsification, groups, size)
    workspace = _Workspace(chunk)
    sparsifiers, deltas = _sparsifiers(
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
    factors = _set_norm_factors(sparsifiers, deltas, size, chunk, workspace)
    rescaled = [s is not None and s.norm is not None for s in sparsifiers]
    return RescaleFactors(
        tuple(f if r else 1.0 for f, r in zip(factors, rescaled)),
        tuple(s.mask if s is not None and r else None for s, r in zip(sparsifiers, rescaled)),
    )


def tensor_selections(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    sparsification: Sparsification = "magnitude",
    method: str = "task-vector merge",
) -> list[list[TensorSelection]]:
    """Each model's magnitude selections of its whole task vector (TIES, breadcrumbs).

    The per-tensor reduction of the magnitude-trimming methods: with them, any
    block of rows is merged alone by :func:`generalized_task_arithmetic`
    (``selections`` and ``offset``) exactly as the whole tensor would be.

    Returns
    -------
    list of list of TensorSelection
        Per model: ``[]`` (everything kept), ``[kept]`` (``"magnitude"``) or
        ``[kept, dropped again]`` (``"magnitude_outliers"``).

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> tensor_selections([torch.tensor([1.0, -4.0, 3.0, 2.0])], base, density=0.5)
    [[TensorSelection(value=3.0, cutoff=None)]]
    """
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    n = len(tensors)
    densities = _per_model(density, 1.0, n, "density", method)
    gammas = _per_model(gamma, 0.0, n, "gamma", method)
    base_flat = base.reshape(-1)
    size = base_flat.numel()
    chunk = max(1, min(size, _CHUNK))
    workspace = _Workspace(chunk)
    result = []
    for i in range(n):
        flat = tensors[i].reshape(-1)

        def delta_of(index: slice, out: torch.Tensor | None, flat: torch.Tensor = flat) -> torch.Tensor:
            return torch.sub(flat[index], base_flat[index].to(torch.float32), out=out)

        def magnitudes(delta_of: Callable[..., torch.Tensor] = delta_of) -> Iterator[torch.Tensor]:
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                yield delta_of(slice(start, stop), workspace.get("ties", stop - start)).abs_()

        sparsifier = _Sparsifier(
            delta_of,
            size,
            method=sparsification,
            density=densities[i],
            gamma=gammas[i],
            rescale=False,
            rescale_method="exact",
            seed=0,
            threshold=None,
            name="",
            chunk=chunk,
            workspace=workspace,
        )
        result.append([TensorSelection.of(t, magnitudes) for t in sparsifier.thresholds])
    return result


def _chunks(size: int, chunk: int, offset: int) -> Iterator[slice]:
    """Slices of at most ``chunk`` entries; with chunks smaller than the tensor, their
    bounds fall on multiples of ``chunk`` of the whole tensor's flat index."""
    if chunk >= size:
        if size > 0:
            yield slice(0, size)
        return
    start = 0
    while start < size:
        stop = min(size, start + chunk - (offset + start) % chunk)
        yield slice(start, stop)
        start = stop


def _elect(
    flats: Sequence[torch.Tensor],
    base_part: torch.Tensor,
    index: slice,
    start: int,
    sparsifiers: Sequence[_Sparsifier | None],
    weights: Sequence[float],
    consensus_method: ConsensusMethod,
    normalize: bool,
    workspace: _Workspace,
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
        delta = torch.sub(flats[i][index], base_part, out=workspace.get("delta", length))
        sparsifier = sparsifiers[i]
        scale = w
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
