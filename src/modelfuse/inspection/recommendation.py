"""Which merge method the figures point to, with the reasons, from stated thresholds.

The rules, in order (the first that applies names the method; :data:`THRESHOLDS`
holds the numbers):

1. one model besides the base: nothing to resolve, ``task_arithmetic``;
2. a loss barrier above ``barrier`` (relative to the endpoints' mean loss)
   between two models: averaging their weights is not safe; combine their
   predictions (``modelfuse ensemble``) or try ``ties``/``dare_ties`` at density
   0.2-0.5 and compare;
3. mean cosine at or above ``aligned_cosine``: the task vectors share a
   direction, which averaging keeps: ``linear`` (or ``model_stock``);
4. sign conflict at or above ``high_conflict``, or mean cosine at or below
   ``opposed_cosine``: ``ties`` or ``dare_ties`` at density ~0.2-0.5;
5. sign conflict below ``low_conflict``: ``task_arithmetic`` when measured
   untrimmed, else ``ties`` at the configuration's density (the trim is what
   keeps it low);
6. otherwise (moderate conflict): ``ties`` at the overlap density when trimming
   to it brings the conflict below ``low_conflict``, else ``task_arithmetic``
   with ``lambda`` below 1 or ``ties`` at density 0.5.

Reasons added whatever the rule: task-vector norms differing by more than
``norm_ratio`` times (set weights), and one model's share of the merged delta
above ``dominant_share``.

For calibration: two independent task vectors (random signs) have a cosine
near 0 and, untrimmed, a sign conflict near 25% (at each entry the smaller of
two opposite values is rejected, and signs differ at half of the entries);
trimmed to density d, the conflict falls to about d / 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelfuse.inspection.barrier import Barrier
from modelfuse.inspection.figures import TaskVectorFigures

__all__ = ["THRESHOLDS", "Recommendation", "recommend"]

THRESHOLDS: dict[str, float] = {
    "barrier": 0.05,
    "aligned_cosine": 0.3,
    "opposed_cosine": -0.1,
    "high_conflict": 0.35,
    "low_conflict": 0.15,
    "norm_ratio": 3.0,
    "dominant_share": 0.6,
}
"""The numbers the rules compare with (see the module's docstring)."""


@dataclass(frozen=True)
class Recommendation:
    """A merge method and why.

    Attributes
    ----------
    method : str
        A merge method's name (``"ensemble"`` when no weight merge is advised).
    summary : str
        One sentence: the method and the figures that chose it.
    reasons : tuple of str
        Every figure that counted, one sentence each.
    """

    method: str
    summary: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "summary": self.summary, "reasons": list(self.reasons)}


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def recommend(
    overall: TaskVectorFigures,
    labels: Sequence[str],
    *,
    overlap_density: float | None = None,
    conflict_density: float | None = None,
    barriers: Sequence[Barrier] = (),
) -> Recommendation:
    """The method the figures of the whole model point to.

    Parameters
    ----------
    overall : TaskVectorFigures
        The figures over every tensor.
    labels : sequence of str
        The models' names.
    overlap_density : float, optional
        The density of the top-k sets (named in the trimming advice).
    conflict_density : float, optional
        The density the sign conflict was measured at (below 1: the
        configuration's trim, which a low conflict then recommends keeping).
    barriers : sequence of Barrier
        Loss barriers measured between pairs of models, if any.

    Examples
    --------
    >>> import torch
    >>> from modelfuse.inspection.figures import tensor_figures
    >>> base = torch.zeros(1000)
    >>> a = torch.linspace(-1, 1, 1000)
    >>> f = tensor_figures([a, a * 0.5 + 0.01], base)
    >>> recommend(f, ["a", "b"]).method
    'linear'
    """
    t = THRESHOLDS
    n = len(labels)
    cosine = overall.mean_cosine
    conflict = overall.conflict
    trimmed = overall.trimmed_conflict
    reasons: list[str] = []
    figures = (
        f"mean cosine {cosine:.2f}, sign conflict {_percent(conflict)}"
        if n > 1 and not math.isnan(cosine) and not math.isnan(conflict)
        else ""
    )
    worst = max(
        barriers, key=lambda b: b.relative if not math.isnan(b.relative) else -1.0, default=None
    )
    if n < 2:
        method = "task_arithmetic"
        summary = (
            "one model besides the base, so nothing to resolve: task_arithmetic (lambda scales it)"
        )
    elif worst is not None and not math.isnan(worst.relative) and worst.relative > t["barrier"]:
        method = "ensemble"
        summary = (
            f"a loss barrier of {worst.barrier:.3g} ({_percent(worst.relative)} of the endpoints' "
            f"loss) between {worst.first} and {worst.second} at alpha {worst.alpha:.2f}: averaging "
            "their weights is not safe; ensemble their predictions (modelfuse ensemble), or try "
            "ties or dare_ties at density ~0.2-0.5 and compare"
        )
    elif math.isnan(cosine) or math.isnan(conflict):
        method = "task_arithmetic"
        summary = (
            "the task vectors are zero: the models equal the base; any method returns the base"
        )
    elif cosine >= t["aligned_cosine"]:
        method = "linear"
        summary = (
            f"task vectors largely agree ({figures}): averaging keeps what they share: "
            "linear (or model_stock)"
        )
    elif conflict >= t["high_conflict"] or cosine <= t["opposed_cosine"]:
        method = "ties"
        summary = f"high interference ({figures}): ties or dare_ties at density ~0.2-0.5"
        if trimmed is not None and overlap_density is not None:
            reasons.append(
                f"trimming each task vector to density {overlap_density:g} changes the conflict "
                f"to {_percent(trimmed)}"
            )
    elif conflict < t["low_conflict"] and conflict_density is not None and conflict_density < 1:
        method = "ties"
        summary = (
            f"low sign conflict once trimmed to density {conflict_density:g} ({figures}): "
            f"ties (or dare_ties) at density {conflict_density:g}, as configured"
        )
    elif conflict < t["low_conflict"]:
        method = "task_arithmetic"
        summary = (
            f"task vectors nearly orthogonal and low sign conflict ({figures}): task_arithmetic"
        )
    elif trimmed is not None and trimmed < t["low_conflict"] and overlap_density is not None:
        method = "ties"
        summary = (
            f"moderate sign conflict ({figures}) that trimming to density {overlap_density:g} "
            f"lowers to {_percent(trimmed)}: ties at density ~{overlap_density:g}"
        )
    else:
        method = "task_arithmetic"
        summary = (
            f"moderate sign conflict ({figures}): task_arithmetic with lambda below 1, "
            "or ties at density 0.5"
        )
    if n > 1 and figures:
        reasons.insert(0, f"mean pairwise cosine of the task vectors: {cosine:.3f}")
        reasons.insert(1, f"sign conflict (entries TIES' election rejects): {_percent(conflict)}")
    norms = overall.norms
    if n > 1 and norms.min() > 0 and norms.max() / norms.min() > t["norm_ratio"]:
        big, small = int(np.argmax(norms)), int(np.argmin(norms))
        reasons.append(
            f"task-vector norms differ {norms.max() / norms.min():.1f}x ({labels[big]} "
            f"{norms[big]:.3g}, {labels[small]} {norms[small]:.3g}): set weights, or rescale"
        )
    share = overall.share
    if n > 1 and np.isfinite(share).all() and share.max() > t["dominant_share"]:
        top = int(np.argmax(share))
        reasons.append(f"{labels[top]} makes {_percent(float(share[top]))} of the merged delta")
    for barrier in barriers:
        reasons.append(
            f"loss barrier {barrier.first} - {barrier.second}: {barrier.barrier:.3g} at alpha "
            f"{barrier.alpha:.2f}"
        )
    return Recommendation(method, summary, tuple(reasons))
