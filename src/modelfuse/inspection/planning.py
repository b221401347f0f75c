"""Planning an inspection: the merge's plan, the base, and each tensor's settings, checked
before any tensor is read (:func:`plan_inspection`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfuse.checkpoint import Checkpoint, open_checkpoint
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge.config import MergeConfig, load_config
from modelfuse.merge.engine import close_plan, plan_merge
from modelfuse.merge.multistage_config import is_multistage
from modelfuse.merge.open_inputs import locate
from modelfuse.merge.plan import MergePlan, TensorTask

__all__ = ["DEFAULT_DENSITY", "DEFAULT_SAMPLE", "InspectionPlan", "TensorJob", "plan_inspection"]

DEFAULT_DENSITY = 0.2
"""The density of the top-k sets when neither the caller nor the configuration gives one."""

DEFAULT_SAMPLE = 1 << 16
"""Entries above which a tensor's overlap and sign conflict are measured on a strided sample."""


@dataclass(frozen=True)
class TensorJob:
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
) -> list[TensorJob]:
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
            TensorJob(
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
    jobs: list[TensorJob] = field(repr=False)
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
