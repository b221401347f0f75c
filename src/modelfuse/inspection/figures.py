r"""The figures of task vectors, tensor by tensor, and their sums over groups of tensors.

For models :math:`\theta_1..\theta_N` fine-tuned from a base :math:`\theta_b`,
the task vectors are :math:`\tau_i = \theta_i - \theta_b` (computed in float32)
and the models' weights :math:`w_i` (the configuration's ``weight``, else 1).
:func:`tensor_figures` reads one tensor of every model chunk by chunk and
returns sums from which every figure follows; sums add up over tensors, so a
group of tensors (attention, one layer, the whole model) is the sum of its
tensors' :class:`TaskVectorFigures`:

- norm: :math:`\|\tau_i\|_2`;
- cosine: :math:`\langle\tau_i, \tau_j\rangle / (\|\tau_i\| \|\tau_j\|)`;
- sign conflict (at a density :math:`d`): trim each :math:`\tau_i` to its
  :math:`\max(1, \lfloor d n \rfloor)` entries of largest magnitude (TIES' trim,
  ties to the lower index), :math:`x_i = w_i \hat\tau_i`, elect
  :math:`\gamma = \operatorname{sign}(\sum_i x_i)` (``"sum"``) or the sign of
  :math:`\sum_i \operatorname{sign}(x_i)` (``"count"``), zero electing +.
  The conflict rate is the fraction of non-zero :math:`x_{i,e}` whose sign is not
  :math:`\gamma_e`: exactly the entries TIES' election leaves out of the merge;
- overlap: the Jaccard index :math:`|K_i \cap K_j| / |K_i \cup K_j|` of the sets
  :math:`K_i` of the :math:`\max(1, \lfloor d n \rfloor)` largest-magnitude entries
  of :math:`\tau_i` (zeros excluded), at the overlap density;
- share in the merged delta: with :math:`\delta = \sum_j w_j \tau_j` (the task
  arithmetic direction), model :math:`i`'s share is
  :math:`\langle w_i \tau_i, \delta\rangle / \|\delta\|^2`, its projection on the
  merged delta; the shares add up to 1 and a negative one pulls against the others.

Over a group, every ratio is a ratio of sums over its tensors (the cosine of
the group's concatenated task vectors, the conflict among all its entries, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.inspection.sample_signs import WHOLE_ROWS, add_gram, sample_sign_sums
from modelfuse.inspection.selection import (
    Consensus,
    Cut,
    Election,
    TaskVectorChunks,
    find_cuts,
    members,
)
from modelfuse.merge.methods.magnitude_threshold import kept_count

__all__ = ["CHUNK", "READ_BLOCK", "TaskVectorFigures", "streamed_figures", "tensor_figures"]

CHUNK = 1 << 18
"""Entries per chunk: every temporary is a few chunks, whatever the tensor's size. Few,
long operations: with several threads measuring at once, many short ones spend their
time waiting for each other (each takes the interpreter's lock to start)."""

READ_BLOCK = 1 << 20
"""Entries per block of rows read at once by a streamed inspection (converted to float32
a chunk at a time)."""


@dataclass(frozen=True)
class TaskVectorFigures:
    """Sums over the entries of one tensor (or of a group of tensors) of N task vectors.

    Add two with ``+``; the figures are properties computed from the sums.

    Attributes
    ----------
    tensors, entries : int
        Tensors and entries (per model) summed.
    dots : ndarray (N, N)
        :math:`\\sum \\tau_i \\tau_j`; the diagonal holds the squared norms.
    projections : ndarray (N,)
        :math:`\\langle w_i \\tau_i, \\delta \\rangle` with :math:`\\delta = \\sum_j w_j \\tau_j`.
    delta_square : float
        :math:`\\|\\delta\\|^2`.
    shared : ndarray (N, N)
        Entries in the top-k sets of both i and j; the diagonal is each set's size.
    nonzero, dropped : ndarray (N,)
        Non-zero entries of :math:`x_i` at the conflict density, and those whose
        sign the election rejects.
    trimmed_nonzero, trimmed_dropped : ndarray (N,) or None
        The same at the overlap density, when it differs from the conflict density.
    signed_entries : int
        Entries (per model) behind ``shared``, ``nonzero`` and ``dropped``: all of
        them, or a strided sample of large tensors (see :func:`tensor_figures`).
    """

    tensors: int
    entries: int
    dots: np.ndarray
    projections: np.ndarray
    delta_square: float
    shared: np.ndarray
    nonzero: np.ndarray
    dropped: np.ndarray
    trimmed_nonzero: np.ndarray | None = None
    trimmed_dropped: np.ndarray | None = None
    signed_entries: int = 0

    @classmethod
    def zeros(cls, n_models: int, trimmed: bool = False) -> TaskVectorFigures:
        """Empty sums for ``n_models`` models."""
        vector = np.zeros(n_models)
        return cls(
            0,
            0,
            np.zeros((n_models, n_models)),
            vector,
            0.0,
            np.zeros((n_models, n_models)),
            vector,
            vector,
            vector if trimmed else None,
            vector if trimmed else None,
        )

    def __add__(self, other: TaskVectorFigures) -> TaskVectorFigures:
        def plus(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if a is None:
                return b
            if b is None:
                return a
            return a + b

        return TaskVectorFigures(
            self.tensors + other.tensors,
            self.entries + other.entries,
            self.dots + other.dots,
            self.projections + other.projections,
            self.delta_square + other.delta_square,
            self.shared + other.shared,
            self.nonzero + other.nonzero,
            self.dropped + other.dropped,
            plus(self.trimmed_nonzero, other.trimmed_nonzero),
            plus(self.trimmed_dropped, other.trimmed_dropped),
            self.signed_entries + other.signed_entries,
        )

    @property
    def norms(self) -> np.ndarray:
        """:math:`\\|\\tau_i\\|_2` per model."""
        return np.sqrt(np.clip(np.diag(self.dots), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """Pairwise cosine similarities (NaN where a task vector is zero)."""
        norms = self.norms
        outer = np.outer(norms, norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(outer > 0, self.dots / np.where(outer > 0, outer, 1.0), np.nan)
        return np.clip(cosine, -1.0, 1.0)

    @property
    def mean_cosine(self) -> float:
        """The mean cosine over pairs of models (NaN with fewer than two, or all zero)."""
        return _mean_off_diagonal(self.cosine)

    @property
    def conflict(self) -> float:
        """The fraction of non-zero weighted entries whose sign TIES' election rejects."""
        return _ratio(float(self.dropped.sum()), float(self.nonzero.sum()))

    @property
    def conflict_per_model(self) -> np.ndarray:
        """Each model's fraction of its non-zero entries rejected by the election."""
        return _ratios(self.dropped, self.nonzero)

    @property
    def trimmed_conflict(self) -> float | None:
        """:attr:`conflict` at the overlap density (None when it equals the conflict density)."""
        if self.trimmed_nonzero is None or self.trimmed_dropped is None:
            return None
        return _ratio(float(self.trimmed_dropped.sum()), float(self.trimmed_nonzero.sum()))

    @property
    def overlap(self) -> np.ndarray:
        """Pairwise Jaccard indices of the top-k sets (NaN where both are empty)."""
        kept = np.diag(self.shared)
        union = kept[:, None] + kept[None, :] - self.shared
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.shared / np.where(union > 0, union, 1.0), np.nan)

    @property
    def mean_overlap(self) -> float:
        """The mean Jaccard index over pairs of models."""
        return _mean_off_diagonal(self.overlap)

    @property
    def share(self) -> np.ndarray:
        """Each model's projection on the merged delta over its squared norm (sums to 1)."""
        if self.delta_square <= 0:
            return np.full(len(self.projections), np.nan)
        return self.projections / self.delta_square


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _ratios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _mean_off_diagonal(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    values = matrix[np.triu_indices(n, 1)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _per_model(
    value: Sequence[float] | float | None, n: int, default: float, key: str
) -> list[float]:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        values = [float(value)] * n
    else:
        values = [float(v) for v in value]
    if len(values) != n:
        raise ConfigError(f"{key}: {len(values)} values for {n} models; give one per model")
    return values


def _check_density(values: list[float], key: str) -> None:
    for value in values:
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{key}: expected a density in (0, 1], got {value!r}; pass e.g. 0.2")


def tensor_figures(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float] | None = None,
    overlap_density: Sequence[float] | float = 0.2,
    conflict_density: Sequence[float] | float = 1.0,
    consensus_method: Consensus = "sum",
    sample: int | None = None,
    chunk: int = CHUNK,
) -> TaskVectorFigures:
    """The sums of :class:`TaskVectorFigures` for one tensor of N models and their base.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name (any float dtype; read as float32 chunk
        by chunk, never copied whole). Not modified.
    base : Tensor
        The base model's tensor of that name, of the same shape.
    weight : sequence of float, optional
        :math:`w_i` per model (default 1).
    overlap_density : float or sequence of float, default 0.2
        Fraction of entries in each top-k set, in (0, 1], per model or for all.
    conflict_density : float or sequence of float, default 1
        TIES' trim before the sign election, in (0, 1] (1: no trim).
    consensus_method : {"sum", "count"}, default "sum"
        The election, as TIES' ``consensus_method``.
    sample : int, optional
        With more than ``sample`` entries, the top-k sets and the sign election
        (overlap and sign conflict) are measured on every ``ceil(n / sample)``-th
        entry only, the trims at the same densities of that sample; norms,
        cosines and shares always use every entry. None: every entry for all.
    chunk : int
        Entries processed at once.

    Returns
    -------
    TaskVectorFigures

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> a, b = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([1.0, -3.0, 1.0, 0.0])
    >>> f = tensor_figures([a, b], base, overlap_density=0.5)
    >>> f.norms.round(4).tolist(), round(float(f.cosine[0, 1]), 4)
    ([2.4495, 3.3166], -0.6155)
    >>> f.dropped.tolist(), f.nonzero.tolist(), f.conflict  # entry 1: b's -3 outvotes a's 2
    ([1.0, 0.0], [3.0, 3.0], 0.16666666666666666)
    """
    n_models = len(tensors)
    shape = tuple(base.shape)
    for i, tensor in enumerate(tensors):
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"tensor_figures: model {i} has shape {list(tensor.shape)}, the base "
                f"{list(shape)}; expected the same shape"
            )
    settings = _settings(
        n_models, weight, overlap_density, conflict_density, consensus_method, chunk
    )
    n = base.numel()
    if n == 0:
        return _empty(n_models, settings[1] != settings[2])
    flats = [t.reshape(-1) for t in tensors]
    base_flat = base.reshape(-1)
    if sample is None or n <= int(sample):
        _check_sample(sample)
        return _accumulate(flats, base_flat, settings, dots=True, signs=True)

    def blocks() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for start in range(0, n, settings[4]):
            stop = min(start + settings[4], n)
            yield [f[start:stop] for f in flats], base_flat[start:stop]

    return streamed_figures(
        blocks(),
        n,
        n_models,
        weight=weight,
        overlap_density=overlap_density,
        conflict_density=conflict_density,
        consensus_method=consensus_method,
        sample=sample,
        chunk=chunk,
    )


Settings = tuple[np.ndarray, list[float], list[float], Consensus, int]


def _settings(
    n_models: int,
    weight: Sequence[float] | None,
    overlap_density: Sequence[float] | float,
    conflict_density: Sequence[float] | float,
    consensus_method: Consensus,
    chunk: int,
) -> Settings:
    """The settings checked and one value per model."""
    if n_models == 0:
        raise ConfigError("tensor_figures: no models; give at least one tensor besides the base")
    if consensus_method not in ("sum", "count"):
        raise ConfigError(
            f"consensus_method: unknown value {str(consensus_method)[:40]!r}; valid: sum, count"
        )
    weights = np.array(_per_model(weight, n_models, 1.0, "weight"))
    overlap = _per_model(overlap_density, n_models, 0.2, "overlap_density")
    conflict = _per_model(conflict_density, n_models, 1.0, "conflict_density")
    _check_density(overlap, "overlap_density")
    _check_density(conflict, "conflict_density")
    return weights, overlap, conflict, consensus_method, max(1, int(chunk))


def _check_sample(sample: int | None) -> None:
    if sample is not None and int(sample) < 1:
        raise ConfigError(f"sample: expected a positive number of entries, got {sample}")


def streamed_figures(
    blocks: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]],
    n: int,
    n_models: int,
    *,
    weight: Sequence[float] | None = None,
    overlap_density: Sequence[float] | float = 0.2,
    conflict_density: Sequence[float] | float = 1.0,
    consensus_method: Consensus = "sum",
    sample: int,
    chunk: int = CHUNK,
) -> TaskVectorFigures:
    """:func:`tensor_figures` with a ``sample``, from the tensor's entries given block by block.

    One pass: each block (the models' entries and the base's, flat, in index
    order, of any float dtype) adds to the dot products and gives up its entries
    at flat indices divisible by ``ceil(n / sample)``; the overlap and the sign
    conflict are then measured on those (about ``sample`` entries per model).
    Memory is a block and the sample, so a large tensor can be read in blocks
    of rows (:meth:`~modelfuse.checkpoint.Checkpoint.read_rows`) and never whole.

    Examples
    --------
    >>> base, a = torch.zeros(6), torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    >>> blocks = [([a[:4]], base[:4]), ([a[4:]], base[4:])]
    >>> f = streamed_figures(blocks, 6, 1, sample=3, overlap_density=0.5)
    >>> float(f.dots[0, 0]), f.signed_entries  # every entry; entries 0, 2, 4 sampled
    (19.25, 3)
    """
    _check_sample(sample)
    settings = _settings(
        n_models, weight, overlap_density, conflict_density, consensus_method, chunk
    )
    weights, _, _, _, width = settings
    stride = -(-n // int(sample))
    dots = _ChunkDots(n_models, width)
    span = max(width, CHUNK - CHUNK % width)  # entries converted at once
    # the sampled task vectors (flat indices divisible by the stride), picked from the
    # float32 chunks already computed into one buffer
    sampled = torch.empty(n_models, -(-n // stride))
    start = picked = 0
    for models, base in blocks:
        flats = [block.reshape(-1) for block in models]
        base_flat = base.reshape(-1)
        length = base_flat.numel()
        if start + length > n:
            raise ValueError(f"streamed_figures: the blocks hold more than {n} entries")
        # pieces of whole chunks: the chunks start where they did in the block, and the
        # float32 buffers stay small whatever the block's size
        for offset in range(0, length, span):
            stop = min(offset + span, length)
            taus = dots.add([f[offset:stop] for f in flats], base_flat[offset:stop])
            first = (-(start + offset)) % stride
            if first < stop - offset:
                count = -(-(stop - offset - first) // stride)
                sampled[:, picked : picked + count].copy_(taus[:, first::stride])
                picked += count
        start += length
    if start != n:
        raise ValueError(f"streamed_figures: the blocks hold {start} entries, expected {n}")
    gram = dots.sums()
    figures = _sample_figures(sampled, settings)
    with np.errstate(all="ignore"):  # NaN or inf inputs: the caller checks the norms
        projections = weights * (gram @ weights)
        delta_square = float(weights @ gram @ weights)
    return replace(
        figures, entries=n, dots=gram, projections=projections, delta_square=delta_square
    )


def _sample_figures(sampled: torch.Tensor, settings: Settings) -> TaskVectorFigures:
    """The sign figures of the sampled task vectors (N, m): whole rows when they are short
    enough, else chunk by chunk."""
    weights, overlap, conflict, consensus_method, _ = settings
    n_models, m = sampled.shape
    if m > WHOLE_ROWS:
        return _accumulate(sampled, None, settings, dots=False, signs=True)
    sums = sample_sign_sums(
        sampled,
        weights,
        [kept_count(d, m) for d in overlap],
        [kept_count(d, m) for d in conflict],
        consensus_method,
    )
    return TaskVectorFigures(
        1,
        m,
        np.zeros((n_models, n_models)),
        np.zeros(n_models),
        0.0,
        sums.shared,
        sums.nonzero,
        sums.dropped,
        sums.trimmed_nonzero,
        sums.trimmed_dropped,
        m,
    )


class _ChunkDots:
    """The task vectors of a tensor block by block and their pairwise dot products, as
    :func:`~modelfuse.inspection.sample_signs.add_gram` sums them chunk by chunk (each
    chunk's float32 dot added to a float64 total, in chunk order; a matrix product per
    chunk for more than three models), in fewer calls: a piece of whole chunks is
    converted at once, the totals are Python floats."""

    def __init__(self, n_models: int, width: int) -> None:
        self.n, self.width = n_models, width
        self.buffer = torch.empty(n_models, 0)
        self.base = torch.empty(0)
        self.pairs = [(i, j) for i in range(n_models) for j in range(i + 1)]
        self.totals = [0.0] * len(self.pairs)
        self.matrix = np.zeros((n_models, n_models))

    def add(self, flats: Sequence[torch.Tensor], base_flat: torch.Tensor) -> torch.Tensor:
        """Add a piece of entries (the models' and the base's, flat) starting a chunk;
        return its task vectors, (N, length) float32, valid until the next call."""
        length = base_flat.numel()
        if self.buffer.shape[1] < length:  # the largest block so far
            self.buffer = torch.empty(self.n, length)
            self.base = torch.empty(length)
        taus = self.buffer[:, :length]
        for row, flat in zip(taus, flats):
            row.copy_(flat)
        taus.sub_(self.base[:length].copy_(base_flat))
        if self.n > 3:
            for start in range(0, length, self.width):
                add_gram(taus[:, start : start + self.width], self.matrix)
            return taus
        rows = taus.numpy()  # numpy's float32 dot: faster than torch's on these lengths
        totals = self.totals
        for start in range(0, length, self.width):
            chunk = rows[:, start : start + self.width]
            for p, (i, j) in enumerate(self.pairs):
                totals[p] += float(np.dot(chunk[i], chunk[j]))
        return taus

    def sums(self) -> np.ndarray:
        """The (N, N) dot products of everything added."""
        if self.n > 3:
            return self.matrix
        out = np.zeros((self.n, self.n))
        for (i, j), total in zip(self.pairs, self.totals):
            out[i, j] = out[j, i] = total
        return out


def _task_vectors(
    flats: Sequence[torch.Tensor],
    base_flat: torch.Tensor | None,
    start: int,
    length: int,
    taus_buffer: torch.Tensor,
    base_buffer: torch.Tensor,
) -> torch.Tensor:
    """Entries ``start:start + length`` of every task vector, (N, length) float32: the
    float32 differences of the entries converted to float32 (a subtraction of mixed
    dtypes would give the same values, at half the speed)."""
    taus = taus_buffer[:, :length]
    for i, flat in enumerate(flats):
        taus[i].copy_(flat[start : start + length])
    if base_flat is not None:
        taus.sub_(base_buffer[:length].copy_(base_flat[start : start + length]))
    return taus


def _accumulate(
    flats: Sequence[torch.Tensor],
    base_flat: torch.Tensor | None,
    settings: Settings,
    *,
    dots: bool,
    signs: bool,
) -> TaskVectorFigures:
    """One pass over the entries: the dot products (``dots``) and the top-k sets and
    elections (``signs``, after the selection pass that finds the thresholds).

    ``base_flat`` None: ``flats`` is an (N, n) float32 tensor of the task vectors
    themselves (a sample); their magnitudes are then taken once, for the selection
    passes and the sets alike, and chunks are views of both.
    """
    weights, overlap, conflict, consensus_method, chunk = settings
    n_models = len(flats)
    n = flats[0].numel() if base_flat is None else base_flat.numel()
    given = given_magnitudes = None
    if base_flat is None:
        given = flats if isinstance(flats, torch.Tensor) else torch.stack(list(flats))
        given_magnitudes = given.abs() if signs else None
    chunk = max(1, min(int(chunk), n))
    overlap_k = [kept_count(d, n) for d in overlap]
    conflict_k = [kept_count(d, n) for d in conflict]
    trimmed = overlap_k != conflict_k
    overlap_cuts: list[Cut] = []
    conflict_cuts: list[Cut] = []
    if signs:
        if given_magnitudes is not None:
            models = [TaskVectorChunks(row, None, chunk) for row in given_magnitudes]
        else:
            models = [TaskVectorChunks(flat, base_flat, chunk) for flat in flats]
        cuts = [find_cuts(model, [ko, kc]) for model, ko, kc in zip(models, overlap_k, conflict_k)]
        overlap_cuts = [c[k] for c, k in zip(cuts, overlap_k)]
        conflict_cuts = [c[k] for c, k in zip(cuts, conflict_k)]
    untrimmed = all(k >= n for k in conflict_k)  # the election sees every entry
    unweighted = bool((weights == 1.0).all())
    weight_column = torch.tensor(weights, dtype=torch.float32).unsqueeze(1)
    gram = np.zeros((n_models, n_models))
    shared = np.zeros((n_models, n_models))
    election = Election(n_models, consensus_method)
    trimmed_election = Election(n_models, consensus_method) if trimmed else None
    taus_buffer = torch.empty(n_models, chunk)
    width = chunk if signs else 0  # the buffers of the sign figures, when measured
    magnitudes_buffer = torch.empty(n_models, width)
    sets_buffer = torch.empty(n_models, width)
    values_buffer = torch.empty(n_models, width)
    signs_buffer = torch.empty(n_models, width)
    base_buffer = torch.empty(chunk)
    tally_buffer = torch.empty(width)
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        if given is not None:
            taus = given[:, start : start + length]
        else:
            taus = _task_vectors(flats, base_flat, start, length, taus_buffer, base_buffer)
        if dots:
            add_gram(taus, gram)
        if not signs:
            continue
        if given_magnitudes is not None:
            magnitudes = given_magnitudes[:, start : start + length]
        else:
            magnitudes = torch.abs(taus, out=magnitudes_buffer[:, :length])
        sets = members(magnitudes, overlap_cuts, start, sets_buffer[:, :length])
        add_gram(sets, shared)
        values = values_buffer[:, :length]
        sign_buffer = signs_buffer[:, :length]
        tally = tally_buffer[:length]
        if untrimmed:
            values = taus if unweighted else torch.mul(taus, weight_column, out=values)
        elif not trimmed:
            torch.mul(taus, sets, out=values)
        else:
            torch.mul(taus, members(magnitudes, conflict_cuts, start, values), out=values)
        if not unweighted and not untrimmed:
            values.mul_(weight_column)
        election.add(values, sign_buffer, tally)
        if trimmed_election is not None:
            values = torch.mul(taus, sets, out=values_buffer[:, :length])
            if not unweighted:
                values.mul_(weight_column)
            trimmed_election.add(values, sign_buffer, tally)
    with np.errstate(all="ignore"):  # NaN or inf inputs: the caller checks the norms
        projections = weights * (gram @ weights)
        delta_square = float(weights @ gram @ weights)
    return TaskVectorFigures(
        1,
        n,
        gram,
        projections,
        delta_square,
        shared,
        election.nonzero,
        election.dropped,
        None if trimmed_election is None else trimmed_election.nonzero,
        None if trimmed_election is None else trimmed_election.dropped,
        n if signs else 0,
    )


def _empty(n_models: int, trimmed: bool) -> TaskVectorFigures:
    return replace(TaskVectorFigures.zeros(n_models, trimmed), tensors=1)
