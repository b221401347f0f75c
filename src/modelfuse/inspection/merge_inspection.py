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

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelfuse.errors import ConfigError
from modelfuse.inspection.barrier import Barrier, LossFunction, interpolation_barrier
from modelfuse.inspection.figures import TaskVectorFigures
from modelfuse.inspection.groups import OTHER, TENSOR_GROUPS, tensor_group, tensor_layer
from modelfuse.inspection.measuring import base_reader, measure_all, model_state
from modelfuse.inspection.planning import (
    DEFAULT_SAMPLE,
    InspectionPlan,
    plan_inspection,
)
from modelfuse.inspection.recommendation import recommend
from modelfuse.inspection.results import MergeInspection
from modelfuse.merge.config import MergeConfig
from modelfuse.merge.execute import NonFiniteInputWarning, default_threads
from modelfuse.merge.plan import MergePlan

__all__ = ["inspect_merge", "run_inspection"]


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
    sample : int or None, default 65536
        Tensors of more entries have their overlap and sign conflict measured
        on a strided sample of about this many entries (every
        ``ceil(n / sample)``-th, trimmed at the same densities); norms, cosines
        and shares always use every entry. None measures every entry (exact
        TIES trims of large tensors, in about three times as long).
        A sampled rate's standard error is about ``sqrt(p (1 - p) / m)`` over
        the ``m`` sampled entries it counts (``m`` is the sample times the
        density times the number of models: at most 0.31 percentage point per
        tensor for two models at densities from 0.2), and less over a group.
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
    measured = measure_all(jobs, workers, progress)
    barriers: tuple[Barrier, ...] = ()
    if loss is not None:
        base_reads = {job.task.name: base_reader(job) for job in jobs}
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
        first = model_state(plan, index[a], base_reads)
        second = model_state(plan, index[b], base_reads)
        results.append(interpolation_barrier(first, second, loss, alphas=alphas, names=(a, b)))
        del first, second
    return results
