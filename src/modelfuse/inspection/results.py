"""What an inspection found: :class:`MergeInspection`, its JSON and its table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelfuse.inspection.barrier import Barrier
from modelfuse.inspection.figures import (
    TaskVectorFigures,
)
from modelfuse.inspection.groups import (
    short_label,
)
from modelfuse.inspection.recommendation import Recommendation

__all__ = ["DEFINITIONS", "MergeInspection"]


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
