"""Sparsifying task vectors chunk by chunk: magnitude trims, random drops, DELLA's drops.

A :class:`Sparsifier` holds one model's sparsification of one tensor
(``"magnitude"``: TIES' top-k; ``"magnitude_outliers"``: breadcrumbs' band;
``"random"``: DARE's drops; ``"della_magprune"``: DELLA's magnitude-ranked
drops), prepared once and applied to the task vector chunk by chunk, so the
temporaries are a few chunks whatever the tensor's size. The exact magnitude
thresholds come from :mod:`modelfuse.merge.methods.magnitude_selection`;
:func:`tensor_selections` records them for a whole tensor (the per-tensor
reduction of TIES and breadcrumbs), so that any block of rows merges alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.magnitude_selection import sample_stride, select_top_k, select_top_ks
from modelfuse.merge.methods.magnitude_threshold import (
    MagnitudeThreshold,
    TensorSelection,
    kept_count,
)
from modelfuse.merge.methods.random_drops import (
    della_keep,
    della_probabilities,
    uniform_draws,
    uniform_words,
    unpack_mask,
)
from modelfuse.merge.methods.workspace import Workspace

__all__ = [
    "RescaleMethod",
    "Sparsification",
    "Sparsifier",
    "Workspace",
    "chunk_size",
    "chunk_slices",
    "model_sparsifiers",
    "per_model",
    "task_vector_chunk",
    "tensor_selections",
]

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
RescaleMethod = Literal["exact", "l1", "l2", "linf"]


_CHUNK = 1 << 18
"""Entries merged at once: the work of a tensor runs chunk by chunk, so temporaries stay small."""


_SAMPLE = 1 << 16


def chunk_size(sparsification: str, groups: tuple[int, int], size: int) -> int:
    """Entries merged at once: about :data:`_CHUNK` of them, or the whole tensor.

    DELLA's chunks hold whole groups and a multiple of 8 entries (for the
    packed drop masks); the other sparsifications' chunks any entries.
    """
    if sparsification != "della_magprune":
        return max(1, min(_CHUNK, size))
    whole = groups[0] * groups[1]
    unit = max(1, whole * 8 // math.gcd(whole, 8))
    return max(1, min(size, max(1, _CHUNK // unit) * unit))


def chunk_slices(size: int, chunk: int, offset: int) -> Iterator[slice]:
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


class Sparsifier:
    """One model's sparsification of one tensor, prepared once, then applied chunk by chunk.

    ``delta_of(index, out)`` writes the task vector's entries at a slice of the
    flattened tensor into ``out`` (a new tensor when ``out`` is None) and returns
    it; the chunks must then come in index order (:meth:`restart` starts again).

    :attr:`factor` multiplies what is kept: ``1 / density`` for the ``"exact"``
    rescale, the whole tensor's norm ratio for a norm rescale once
    :func:`set_norm_factors` has run (or given by the engine's reduction), else 1.
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
        workspace: Workspace,
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
        # or, for a tensor small enough, the kept chunks themselves (by flat start), kept
        # by the norm pass for the merge pass (see :func:`set_norm_factors`)
        self.kept: dict[int, torch.Tensor] | None = None
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

    def start_recording(self) -> None:
        """Record the drop masks of the chunks sparsified from now on (see :attr:`mask`)."""
        if self.mask is None:
            self.mask = np.zeros((self.size + 7) // 8, dtype=np.uint8)
        self.recording = True

    def _record(self, keep: torch.Tensor, start: int) -> None:
        # the mask is allocated once by start_recording, before chunks may run in parallel
        if self.mask is None:
            raise RuntimeError("drop masks are recorded only after start_recording()")
        if start % 8:
            raise RuntimeError(f"drop masks are recorded from chunks at multiples of 8, not {start}")
        flat = keep.reshape(-1)
        if flat.dtype == torch.bool:
            flags = flat.numpy()
        elif flat.dtype == torch.float32:  # 0/1 floats: nonzero bit patterns (a conversion
            flags = flat.numpy().view(np.int32) != 0  # to uint8 costs several times more)
        else:
            flags = flat.to(torch.uint8).numpy()
        bits = np.packbits(flags)
        self.mask[start // 8 : start // 8 + bits.size] = bits

    def take(self, start: int, length: int) -> torch.Tensor | None:
        """The kept entries of the chunk at flat ``start`` when the norm pass kept them
        (each is handed out once), else None."""
        if not self.kept:
            return None
        kept = self.kept.pop(start, None)
        return kept if kept is not None and kept.numel() == length else None

    def restart(self) -> None:
        """Start again from the first chunk (the magnitude selectors count ties as they go)."""
        if self._global is not None:
            self.selectors = [self._global[0].selector(self._global[1])]
        else:
            self.selectors = [t.selector() for t in self.thresholds]

    @property
    def stateless(self) -> bool:
        """Whether chunks may be sparsified in any order, from several threads at once
        (random drops: each chunk's draws come from its position alone)."""
        return self.keep_all or self.method in ("random", "della_magprune")

    def __call__(
        self, delta: torch.Tensor, start: int = 0, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """Sparsify the next chunk (``delta`` may be reused), at flat index ``start``
        of the whole tensor; returns it.

        ``workspace`` replaces the sparsifier's own buffers (one per thread when
        :attr:`stateless` chunks are sparsified in parallel). The rescale is left
        to the caller (multiply by :attr:`factor`), which folds it into the
        model's weight.
        """
        if self.keep_all:
            return delta
        length = delta.numel()
        if self.method in ("random", "della_magprune"):
            buffer = (workspace or self.workspace).get("random", length).view(delta.shape)
            if self.mask is not None and not self.recording:
                keep = unpack_mask(self.mask, start, buffer)
            elif self.method == "random" or self.density <= 0:
                # floor(u + d) is 1 with probability d for u ~ U[0, 1): the kept entries.
                keep = uniform_draws(self.seed, start, buffer).add_(self.density).floor_()
            else:
                # the draws as integers, then 0/1 floats into their buffer (spent once the
                # picks are made)
                words = uniform_words(self.seed, start, buffer.view(torch.int32))
                keep = della_keep(
                    delta,
                    words,
                    self.density,
                    self.epsilon,
                    self.groups,
                    out=buffer,
                    workspace=workspace or self.workspace,
                )
                if self.per_entry:
                    keep = keep.div_(
                        della_probabilities(delta.abs(), self.density, self.epsilon, self.groups)
                    )
            if self.recording:
                self._record(keep, start)
            kept = delta.mul_(keep)
        else:
            kept = self.selectors[0](delta, out=self.workspace.get("kept", length))
            if len(self.selectors) > 1:
                # the largest ones, dropped again
                kept.sub_(self.selectors[1](delta, out=self.workspace.get("top", length)))
        return kept


def per_model(
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


def task_vector_chunk(
    flat: torch.Tensor, base_flat: torch.Tensor, index: slice, out: torch.Tensor | None
) -> torch.Tensor:
    """The float32 task vector ``flat - base_flat`` at ``index``, written into ``out`` (a new
    tensor when None): the model's entries converted, then the base's subtracted (no
    float32 copy of the base is made; the same values as a subtraction in float32)."""
    part = flat[index]
    if out is None:
        out = torch.empty(part.shape, dtype=torch.float32)
    return out.copy_(part).sub_(base_flat[index])


def model_sparsifiers(
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
    workspace: Workspace,
    method: str,
) -> tuple[list[Sparsifier | None], list[Callable[[slice, torch.Tensor | None], torch.Tensor]]]:
    """Each model's sparsifier (None without ``sparsification``) and task-vector reader."""
    n = len(flats)
    size = base_flat.numel()
    densities = per_model(density, 1.0, n, "density", method)
    gammas = per_model(gamma, 0.0, n, "gamma", method)
    epsilons = per_model(epsilon, 0.0, n, "epsilon", method)
    deltas: list[Callable[[slice, torch.Tensor | None], torch.Tensor]] = [
        functools.partial(task_vector_chunk, flat, base_flat) for flat in flats
    ]
    sparsifiers: list[Sparsifier | None] = [None] * n
    if sparsification is None:
        return sparsifiers, deltas
    # One generator per model, seeded from ``generator``: each model's draws are
    # one stream, whatever the chunking.
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    for i in range(n):
        sparsifiers[i] = Sparsifier(
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
    densities = per_model(density, 1.0, n, "density", method)
    gammas = per_model(gamma, 0.0, n, "gamma", method)
    base_flat = base.reshape(-1)
    size = base_flat.numel()
    chunk = chunk_size("magnitude", (1, 1), size)
    workspace = Workspace(chunk)
    result = []
    for i in range(n):
        flat = tensors[i].reshape(-1)

        delta_of = functools.partial(task_vector_chunk, flat, base_flat)

        def magnitudes(delta_of: Callable[..., torch.Tensor] = delta_of) -> Iterator[torch.Tensor]:
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                yield delta_of(slice(start, stop), workspace.get("ties", stop - start)).abs_()

        sparsifier = Sparsifier(
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
