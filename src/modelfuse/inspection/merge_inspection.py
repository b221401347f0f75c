"""``inspect_merge``: stream a merge configuration's models and measure their task vectors.

The configuration is read and planned by the merge itself
(:func:`modelfuse.merge.plan_merge`: the same parsing, path lookup, name and
shape checks and per-tensor parameters), then every float tensor of the plan
is read once and reduced to the sums of
:func:`~modelfuse.inspection.figures.tensor_figures`: a tensor whose sign figures
are sampled in blocks of rows (:func:`~modelfuse.inspection.figures.streamed_figures`),
any other whole, one tensor of every model at a time. Memory is bounded by a
few tensors, as in the merge; only the optional loss barrier loads whole
models (it has to run them).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelfuse.checkpoint import Checkpoint, open_checkpoint
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.inspection.barrier import Barrier, LossFunction, interpolation_barrier
from modelfuse.inspection.figures import (
    READ_BLOCK,
    TaskVectorFigures,
    streamed_figures,
    tensor_figures,
)
from modelfuse.inspection.groups import (
    OTHER,
    TENSOR_GROUPS,
    short_label,
    tensor_group,
    tensor_layer,
)
from modelfuse.inspection.recommendation import Recommendation, recommend
from modelfuse.merge.config import MergeConfig, load_config
from modelfuse.merge.engine import close_plan, plan_merge
from modelfuse.merge.execute import NonFiniteInputWarning, default_threads
from modelfuse.merge.multistage_config import is_multistage
from modelfuse.merge.open_inputs import locate
from modelfuse.merge.plan import MergePlan, TensorTask

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_SAMPLE",
    "InspectionPlan",
    "MergeInspection",
    "inspect_merge",
    "plan_inspection",
    "run_inspection",
]

DEFAULT_DENSITY = 0.2
"""The density of the top-k sets when neither the caller nor the configuration gives one."""

DEFAULT_SAMPLE = 1 << 18
"""Entries above which a tensor's overlap and sign conflict are measured on a strided sample."""


@dataclass(frozen=True)
class MergeInspection:
    """What :func:`inspect_merge` measured.

    Attributes
    ----------
    method : str
        The configuration's merge method.
    base : str
        The base model the task vectors start from.
    models : tuple of str
        The models, as the configuration names them.
    overall : TaskVectorFigures
        Sums over every float tensor (see :mod:`modelfuse.inspection.figures`
        for each figure's definition).
    groups : dict of str to TaskVectorFigures
        The same per tensor group (embeddings, norms, head, attention, mlp, other).
    layers : dict of int to TaskVectorFigures
        The same per layer.
    overlap_density, conflict_density : tuple of float
        The densities used (every distinct value over tensors and models).
    consensus_method : str
        The sign election (``"sum"`` unless the configuration says ``"count"``).
    barriers : tuple of Barrier
        Loss barriers between pairs of models (only with a ``loss``).
    recommendation : Recommendation
    skipped : tuple of str
        Tensors left out because an input holds NaN or inf values.
    seconds : float
        Wall time.
    notes : tuple of str
        What the merge's planning noted (a base listed among the models, ...).
    sample : int or None
        The sample size of the overlap and sign conflict of large tensors (None: exact).
    """

    method: str
    base: str
    models: tuple[str, ...]
    overall: TaskVectorFigures
    groups: dict[str, TaskVectorFigures]
    layers: dict[int, TaskVectorFigures]
    overlap_density: tuple[float, ...]
    conflict_density: tuple[float, ...]
    consensus_method: str
    recommendation: Recommendation
    barriers: tuple[Barrier, ...] = ()
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)
    sample: int | None = None

    def scope_dict(self, figures: TaskVectorFigures) -> dict[str, Any]:
        """The figures of one scope (overall, a group, a layer) as plain JSON values."""
        labels = self.models

        def number(value: float) -> float | None:
            return None if not math.isfinite(value) else float(value)

        def matrix(values: np.ndarray) -> list[list[float | None]]:
            return [[number(float(v)) for v in row] for row in values]

        trimmed = figures.trimmed_conflict
        return {
            "tensors": figures.tensors,
            "entries": figures.entries,
            "sign_entries": figures.signed_entries,
            "norm": {m: number(float(v)) for m, v in zip(labels, figures.norms)},
            "cosine": matrix(figures.cosine),
            "mean_cosine": number(figures.mean_cosine),
            "sign_conflict": number(figures.conflict),
            "sign_conflict_per_model": {
                m: number(float(v)) for m, v in zip(labels, figures.conflict_per_model)
            },
            "sign_conflict_at_overlap_density": None if trimmed is None else number(trimmed),
            "overlap": matrix(figures.overlap),
            "mean_overlap": number(figures.mean_overlap),
            "share": {m: number(float(v)) for m, v in zip(labels, figures.share)},
        }

    def to_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON values (NaN as null)."""
        return {
            "method": self.method,
            "base": self.base,
            "models": list(self.models),
            "overlap_density": list(self.overlap_density),
            "conflict_density": list(self.conflict_density),
            "consensus_method": self.consensus_method,
            "sample": self.sample,
            "definitions": DEFINITIONS,
            "overall": self.scope_dict(self.overall),
            "groups": {name: self.scope_dict(f) for name, f in self.groups.items()},
            "layers": {str(i): self.scope_dict(f) for i, f in self.layers.items()},
            "barriers": [b.to_dict() for b in self.barriers],
            "recommendation": self.recommendation.to_dict(),
            "skipped_tensors": list(self.skipped),
            "notes": list(self.notes),
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """Two tables: one row per scope (overall, then each group), then one row per model."""
        from modelfuse.report.table import format_table

        rows = [
            [
                name,
                figures.tensors,
                _fmt(figures.mean_cosine, "{:.3f}"),
                _fmt(figures.conflict, "{:.1%}"),
                _fmt(figures.mean_overlap, "{:.3f}"),
            ]
            for name, figures in [("overall", self.overall), *self.groups.items()]
        ]
        scopes = format_table(
            ["scope", "tensors", "mean cosine", "sign conflict", "top-k overlap"],
            rows,
            style="text",
        )
        overall = self.overall
        models = format_table(
            ["model", "task-vector norm", "sign conflict", "share of merged delta"],
            [
                [
                    short_label(label),
                    _fmt(float(norm), "{:.4g}"),
                    _fmt(float(conflict), "{:.1%}"),
                    _fmt(float(share), "{:.1%}"),
                ]
                for label, norm, conflict, share in zip(
                    self.models, overall.norms, overall.conflict_per_model, overall.share
                )
            ],
            style="text",
        )
        return scopes + "\n\n" + models


DEFINITIONS = {
    "task_vector": "model minus base, per tensor, in float32",
    "cosine": "<tau_i, tau_j> / (|tau_i| |tau_j|) over the scope's entries",
    "sign_conflict": "fraction of the non-zero entries of w_i * trim(tau_i) (TIES' trim at the "
    "conflict density) whose sign differs from the elected sign sign(sum_i w_i * trim(tau_i)) "
    "(zero elects +): the entries TIES' election leaves out",
    "overlap": "Jaccard index of the sets of the max(1, floor(d * n)) largest-magnitude non-zero "
    "entries of each tensor's task vectors, at the overlap density d",
    "share": "<w_i tau_i, delta> / |delta|^2 with delta = sum_j w_j tau_j; sums to 1",
    "sign_entries": "entries per model behind sign_conflict and overlap: tensors above the "
    "sample size are measured on every ceil(n / sample)-th entry (entries counts them all)",
}


def _fmt(value: float, pattern: str) -> str:
    return pattern.format(value) if math.isfinite(value) else "-"


@dataclass(frozen=True)
class _Job:
    """One tensor: its name, its inputs and the settings resolved for it."""

    task: TensorTask
    base_source: Any  # a TensorSource: read(name), read_rows(name, start, stop)
    base_name: str
    weight: list[float] | None
    overlap: list[float]
    conflict: list[float]
    consensus: str
    sample: int | None
    nbytes: int


def _per_model(value: Any, n: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


def _densities(value: Any, n: int, key: str, name: str) -> list[float]:
    values = _per_model(value, n) or [1.0] * n
    for v in values:
        if not 0.0 < v <= 1.0:
            raise ConfigError(
                f"{key}: tensor {name[:80]} gets density {v:.4g}; inspect measures densities in "
                "(0, 1]; set density above 0"
            )
    return values


def _open_base(
    plan: MergePlan, config: MergeConfig, folder: Path, base: str | Path | None
) -> tuple[str, Checkpoint | None]:
    """The base's label, and a checkpoint opened here when the plan does not hold the base."""
    if plan.base is not None:
        if base is not None:
            raise ConfigError(
                f"base: the configuration names base_model {str(config.base_model)[:80]}; "
                "give the base once (leave --base, or base= in Python, out)"
            )
        return plan.base.label, None
    reference = str(base) if base is not None else config.base_model
    if reference is None:
        raise ConfigError(
            f"base_model: merge method {config.merge_method!r} with no base_model; task vectors "
            "are differences from the base: add base_model: PATH (the model the others were "
            "fine-tuned from) to the configuration, or pass --base PATH (base= in Python)"
        )
    key = "--base" if base is not None else "base_model"
    checkpoint = open_checkpoint(locate(reference, folder if base is None else Path.cwd(), key))
    problems = []
    for task in plan.tasks:
        if task.action != "merge":
            continue
        if task.name not in checkpoint:
            problems.append(f"tensor {task.name[:80]} is missing from the base {reference[:80]}")
            continue
        shape = tuple(checkpoint.info(task.name).shape)
        rows = task.shared_rows
        ok = shape == task.shape or (
            rows is not None
            and len(shape) == len(task.shape)
            and shape[1:] == task.shape[1:]
            and shape[0] >= rows
        )
        if not ok:
            problems.append(
                f"tensor {task.name[:80]} has shape {list(shape)} in the base {reference[:80]} "
                f"but {list(task.shape)} in the models"
            )
    if problems:
        checkpoint.close()
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{'; '.join(problems[:3])}{more}; expected the base the models were fine-tuned from"
        )
    return reference, checkpoint


def _jobs(
    plan: MergePlan,
    base_checkpoint: Checkpoint | None,
    density: float | None,
    sample: int | None,
) -> list[_Job]:
    jobs = []
    n = len(plan.models)
    for task in plan.tasks:
        if task.action != "merge":
            continue
        params = task.parameters
        configured = params.get("density")
        conflict = _densities(configured, n, "density", task.name)
        overlap_value = density if density is not None else configured
        overlap = _densities(
            overlap_value if overlap_value is not None else DEFAULT_DENSITY, n, "density", task.name
        )
        consensus = params.get("consensus_method") or "sum"
        if base_checkpoint is not None:
            source, name = base_checkpoint, task.name
        else:
            if task.base is None or task.base_input is None:
                raise ConfigError(f"tensor {task.name[:80]}: the plan gives it no base tensor")
            source, name = task.base.source, task.base_input
        jobs.append(
            _Job(
                task,
                source,
                name,
                _per_model(params.get("weight"), n),
                overlap,
                conflict,
                str(consensus),
                sample,
                sum(m.source.info(i).nbytes for m, i in zip(task.models, task.inputs))
                + source.info(name).nbytes,
            )
        )
    return jobs


def _nonfinite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return False
    if tensor.dtype.itemsize == 1:
        tensor = tensor.to(torch.float32)
    low, high = torch.aminmax(tensor)
    return not (math.isfinite(float(low)) and math.isfinite(float(high)))


def _base_reader(job: _Job) -> Callable[[], torch.Tensor]:
    return lambda: job.base_source.read(job.base_name)


def _measure(job: _Job) -> tuple[TaskVectorFigures | None, list[str], int]:
    """The figures of one tensor, or None and the inputs holding NaN or inf.

    A tensor sampled for the sign figures is read in blocks of rows, one pass,
    never whole; any other is read whole, one tensor of each input at a time.
    """
    task = job.task
    shape = task.shape
    rows = task.shared_rows if task.shared_rows is not None else (shape[0] if shape else 0)
    numel = math.prod(shape[1:]) * rows if shape else 1
    settings = {
        "weight": job.weight,
        "overlap_density": job.overlap,
        "conflict_density": job.conflict,
        "consensus_method": job.consensus,
    }
    if job.sample is not None and numel > job.sample and len(shape) >= 1 and rows > 1:
        figures = streamed_figures(
            _row_blocks(job, rows, numel // rows),
            numel,
            len(task.models),
            sample=job.sample,
            **settings,  # type: ignore[arg-type]
        )
        if np.isfinite(np.diag(figures.dots)).all():
            return figures, [], job.nbytes
        tensors, base = _whole(job)  # rare: read whole to name the input holding NaN or inf
    else:
        tensors, base = _whole(job)
        figures = tensor_figures(
            tensors, base, sample=job.sample, **settings  # type: ignore[arg-type]
        )
        if np.isfinite(np.diag(figures.dots)).all():
            return figures, [], job.nbytes
    bad = [m.label for m, t in zip(task.models, tensors) if _nonfinite(t)]
    if _nonfinite(base):
        bad.insert(0, "the base")
    if not bad:  # finite inputs whose differences overflow float32 when squared
        bad = ["the task vectors (too large to square in float32)"]
    return None, bad, job.nbytes


def _whole(job: _Job) -> tuple[list[torch.Tensor], torch.Tensor]:
    task = job.task
    tensors = [m.source.read(name) for m, name in zip(task.models, task.inputs)]
    base = job.base_source.read(job.base_name)
    if task.shared_rows is not None:
        tensors = [t[: task.shared_rows] for t in tensors]
        base = base[: task.shared_rows]
    return tensors, base


def _row_blocks(
    job: _Job, rows: int, row_size: int
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The task's inputs in blocks of rows of about :data:`READ_BLOCK` entries, in order."""
    task = job.task
    step = max(1, READ_BLOCK // max(row_size, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        models = [
            m.source.read_rows(name, start, stop) for m, name in zip(task.models, task.inputs)
        ]
        yield models, job.base_source.read_rows(job.base_name, start, stop)


def _run(
    jobs: list[_Job],
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> list[tuple[TaskVectorFigures | None, list[str], int]]:
    results: list[Any] = [None] * len(jobs)

    def finish(index: int, value: Any) -> None:
        results[index] = value
        if progress is not None:
            progress(1, value[2])

    # One torch thread per tensor: the work is many operations on chunks of a few MB, which
    # torch's own threads slow down (their start and join cost more than they save).
    cores = torch.get_num_threads()
    if threads <= 1:
        try:
            torch.set_num_threads(1)
            for index, job in enumerate(jobs):
                finish(index, _measure(job))
        finally:
            torch.set_num_threads(cores)
        return results
    pending: dict[Future[Any], int] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="modelfuse-inspect") as pool:
        try:
            torch.set_num_threads(1)
            for index, job in enumerate(jobs):
                pending[pool.submit(_measure, job)] = index
                while len(pending) >= threads:  # at most `threads` tensors in memory
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(pending.pop(future), future.result())
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            torch.set_num_threads(cores)
    return results


def _state(
    plan: MergePlan, which: int, base_read: Mapping[str, Callable[[], torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every float tensor of model ``which`` (-1: the base), read whole (for a barrier)."""
    state = {}
    for task in plan.tasks:
        if task.action != "merge":
            continue
        if which < 0:
            tensor = base_read[task.name]()
        else:
            tensor = task.models[which].source.read(task.inputs[which])
        state[task.name] = tensor if task.shared_rows is None else tensor[: task.shared_rows]
    return state


@dataclass
class InspectionPlan:
    """An inspection opened and checked by :func:`plan_inspection`, before any tensor is read.

    Holds the merge's plan and the checkpoints open; run it with
    :func:`run_inspection` and close it (or use it in a ``with`` block).

    Attributes
    ----------
    method : str
        The configuration's merge method.
    base : str
        The base model the task vectors start from.
    models : tuple of str
        The models, as the configuration names them.
    tensors : int
        Float tensors to measure.
    nbytes : int
        Bytes of every input tensor to read (models and base).
    sample : int or None
        As :func:`inspect_merge` takes it.
    """

    method: str
    base: str
    models: tuple[str, ...]
    sample: int | None
    plan: MergePlan = field(repr=False)
    jobs: list[_Job] = field(repr=False)
    base_checkpoint: Checkpoint | None = field(default=None, repr=False)

    @property
    def tensors(self) -> int:
        return len(self.jobs)

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def close(self) -> None:
        """Close every checkpoint the inspection holds open; idempotent."""
        close_plan(self.plan)
        if self.base_checkpoint is not None:
            with contextlib.suppress(Exception):
                self.base_checkpoint.close()

    def __enter__(self) -> InspectionPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_inspection(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    base: str | Path | None = None,
    density: float | None = None,
    sample: int | None = DEFAULT_SAMPLE,
    allow_crimes: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> InspectionPlan:
    """Open and check an inspection without reading any tensor (see :func:`inspect_merge`).

    ``out`` and ``overwrite`` check an output folder as the merge checks its
    own (not an input, not an existing folder without ``overwrite``); every
    problem of the configuration and its inputs is raised together.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> for name in ("base", "a"):
    ...     save_file({"w": torch.rand(3)}, os.path.join(d, name + ".safetensors"))
    >>> with plan_inspection({"merge_method": "task_arithmetic",
    ...                       "base_model": os.path.join(d, "base.safetensors"),
    ...                       "models": [os.path.join(d, "a.safetensors")]}) as planned:
    ...     planned.tensors, planned.nbytes
    (1, 24)
    """
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(
            f"density: expected a number in (0, 1], got {str(density)[:40]}; pass e.g. 0.2"
        )
    if sample is not None and not (isinstance(sample, int) and sample >= 1):
        raise ConfigError(
            f"sample: expected a positive number of entries or None, got {str(sample)[:40]}"
        )
    given = dict(config) if isinstance(config, Mapping) else config
    if isinstance(given, (str, Path)) and is_multistage(given):
        raise ConfigError(
            f"{str(given)[:80]}: a multi-stage file (several '---' documents); inspect measures "
            "one merge: put the stage to inspect in a file of its own"
        )
    cfg, folder = load_config(given)
    if cfg.slices is not None:
        raise ConfigError(
            "slices: inspect compares whole models; give them as models: (with base_model) "
            "instead of slices"
        )
    plan = plan_merge(given, out, overwrite=overwrite, allow_crimes=allow_crimes)
    base_checkpoint: Checkpoint | None = None
    try:
        base_label, base_checkpoint = _open_base(plan, cfg, folder, base)
        jobs = _jobs(plan, base_checkpoint, density, sample)
    except BaseException:
        close_plan(plan)
        if base_checkpoint is not None:
            base_checkpoint.close()
        raise
    return InspectionPlan(
        cfg.merge_method,
        base_label,
        tuple(m.label for m in plan.models),
        sample,
        plan,
        jobs,
        base_checkpoint,
    )


def inspect_merge(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    base: str | Path | None = None,
    density: float | None = None,
    sample: int | None = DEFAULT_SAMPLE,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    loss: LossFunction | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    alphas: int = 11,
    allow_crimes: bool = False,
) -> MergeInspection:
    """Measure the task vectors of a merge configuration's models, tensor by tensor.

    Parameters
    ----------
    config : path, dict or MergeConfig
        A merge configuration (mergekit's YAML), as :func:`modelfuse.merge.merge`
        takes it; its method, models, base and per-tensor ``weight``,
        ``density`` and ``consensus_method`` are used, nothing is merged.
    base : path, optional
        The base model, for a configuration without ``base_model`` (or whose
        method ignores it, such as ``linear``).
    density : float, optional
        The density of the top-k sets of the overlap (default: the
        configuration's ``density``, else 0.2). The sign conflict is measured
        at the configuration's ``density`` (else 1, no trim); when the two
        differ it is measured at the overlap density too.
    sample : int or None, default 262144
        Tensors of more entries have their overlap and sign conflict measured
        on a strided sample of about this many entries (every
        ``ceil(n / sample)``-th, trimmed at the same densities); norms, cosines
        and shares always use every entry. None measures every entry (exact
        TIES trims of large tensors, in about three times as long).
        A sampled rate's standard error is about ``sqrt(p (1 - p) / m)`` over
        the ``m`` sampled entries it counts (under 0.25 percentage point per
        tensor at densities from 0.2), and less over a group.
    threads : int, optional
        Tensors measured at once (default: all cores).
    progress : callable, optional
        ``progress(tensors_done, bytes_read)`` increments.
    loss : callable, optional
        ``loss(state_dict) -> float`` on your data; with it the loss barrier
        on the line between each pair of models is measured (this loads two
        whole models at a time).
    pairs : sequence of (str, str), optional
        The pairs of models for the barrier, by their names in the
        configuration (``"base"`` for the base); default every pair of models
        (the base and the model when there is one model).
    alphas : int, default 11
        Points on each line.
    allow_crimes : bool, default False
        As for :func:`modelfuse.merge.merge`.

    Returns
    -------
    MergeInspection

    Raises
    ------
    ConfigError, CheckpointError
        The configuration, its models or the base are invalid (every problem
        the merge's planning finds is listed); nothing has been read yet.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> base = torch.randn(64, 64)
    >>> for name, change in [("base", 0), ("a", 1), ("b", 1)]:
    ...     save_file({"layers.0.mlp.w": base + 0.1 * change * torch.randn(64, 64)},
    ...               os.path.join(d, name + ".safetensors"))
    >>> report = inspect_merge({"merge_method": "task_arithmetic",
    ...     "base_model": os.path.join(d, "base.safetensors"),
    ...     "models": [os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")]})
    >>> abs(report.overall.mean_cosine) < 0.1, report.recommendation.method
    (True, 'ties')
    """
    with plan_inspection(
        config, base=base, density=density, sample=sample, allow_crimes=allow_crimes
    ) as planned:
        return run_inspection(
            planned, threads=threads, progress=progress, loss=loss, pairs=pairs, alphas=alphas
        )


def run_inspection(
    planned: InspectionPlan,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    loss: LossFunction | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    alphas: int = 11,
) -> MergeInspection:
    """Measure an inspection planned by :func:`plan_inspection` (arguments as for
    :func:`inspect_merge`); the plan stays open."""
    started = time.perf_counter()
    workers = default_threads() if threads is None else int(threads)
    if workers < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    jobs, labels = planned.jobs, planned.models
    measured = _run(jobs, workers, progress)
    barriers: tuple[Barrier, ...] = ()
    if loss is not None:
        base_reads = {job.task.name: _base_reader(job) for job in jobs}
        barriers = tuple(
            _barriers(planned.plan, labels, planned.base, base_reads, loss, pairs, alphas)
        )
    n = len(labels)
    overall = TaskVectorFigures.zeros(n)
    groups = {name: TaskVectorFigures.zeros(n) for name in [*TENSOR_GROUPS, OTHER]}
    layers: dict[int, TaskVectorFigures] = {}
    skipped = []
    for job, (figures, bad, _) in zip(jobs, measured):
        name = job.task.name
        if figures is None:
            skipped.append(name)
            warnings.warn(
                f"tensor {name[:80]} of {', '.join(bad)} holds NaN or inf values; it is left out "
                "of the figures (a merge would spread them)",
                NonFiniteInputWarning,
                stacklevel=2,
            )
            continue
        overall = overall + figures
        group = tensor_group(name)
        groups[group] = groups[group] + figures
        layer = tensor_layer(name)
        if layer is not None:
            layers[layer] = layers.get(layer, TaskVectorFigures.zeros(n)) + figures
    groups = {k: v for k, v in groups.items() if v.tensors}
    overlap_values = tuple(sorted({d for job in jobs for d in job.overlap}))
    conflict_values = tuple(sorted({d for job in jobs for d in job.conflict}))
    recommendation = recommend(
        overall,
        labels,
        overlap_density=overlap_values[0] if len(overlap_values) == 1 else None,
        conflict_density=conflict_values[0] if len(conflict_values) == 1 else None,
        barriers=barriers,
    )
    return MergeInspection(
        method=planned.method,
        base=planned.base,
        models=labels,
        overall=overall,
        groups=groups,
        layers=dict(sorted(layers.items())),
        overlap_density=overlap_values,
        conflict_density=conflict_values,
        consensus_method=",".join(sorted({job.consensus for job in jobs})) or "sum",
        recommendation=recommendation,
        barriers=barriers,
        skipped=tuple(skipped),
        seconds=time.perf_counter() - started,
        notes=tuple(planned.plan.notes),
        sample=planned.sample,
    )


def _barriers(
    plan: MergePlan,
    labels: tuple[str, ...],
    base_label: str,
    base_reads: Mapping[str, Callable[[], torch.Tensor]],
    loss: LossFunction,
    pairs: Sequence[tuple[str, str]] | None,
    alphas: int,
) -> list[Barrier]:
    index = {label: i for i, label in enumerate(labels)}
    index.setdefault("base", -1)
    index.setdefault(base_label, -1)
    if pairs is None:
        pairs = [
            (labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))
        ] or [("base", labels[0])]
    chosen = []
    for a, b in pairs:
        for name in (a, b):
            if name not in index:
                raise ConfigError(
                    f"pairs: {str(name)[:60]!r} is not a model of the configuration; "
                    f"valid: base, {', '.join(labels)[:200]}"
                )
        chosen.append((a, b))
    results = []
    for a, b in chosen:
        first = _state(plan, index[a], base_reads)
        second = _state(plan, index[b], base_reads)
        results.append(interpolation_barrier(first, second, loss, alphas=alphas, names=(a, b)))
        del first, second
    return results
