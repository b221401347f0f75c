"""The demo's own figures: the greedy-soup trace, the WiSE-FT curve, per-task accuracy and the
federated accuracy per round.

Drawn on :class:`matplotlib.figure.Figure` (no pyplot state) and saved as PNG.
Forest plots and reliability diagrams come from :mod:`modelfuse.report` and
:mod:`modelfuse.calibration.reliability`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "dawin_plot",
    "federated_rounds_figure",
    "federated_rounds_plot",
    "greedy_trace_plot",
    "per_task_plot",
    "wise_ft_plot",
]


def _save(figure, path: Path) -> Path:  # noqa: ANN001
    figure.savefig(path, dpi=110, format="png")
    return path


def greedy_trace_plot(trace: Sequence[tuple[str, float, str]], path: Path) -> Path:
    """The greedy soup's steps: each model alone, then each soup tried (kept or not).

    Parameters
    ----------
    trace : sequence of (label, validation accuracy, status)
        Status ``"alone"`` for single models, ``"accepted"`` or ``"rejected"``
        for soups tried, in the order tried.
    path : Path
        The PNG to write.
    """
    from matplotlib.figure import Figure

    alone = [(label, score) for label, score, status in trace if status == "alone"]
    tried = [(label, score, status) for label, score, status in trace if status != "alone"]
    ranked = sorted(alone, key=lambda item: -item[1])
    figure = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = figure.add_subplot()
    labels = [ranked[0][0]] + [label for label, _, _ in tried]
    xs = np.arange(len(labels))
    running = [ranked[0][1]]
    for _, score, status in tried:
        running.append(score if status == "accepted" else running[-1])
    ax.step(xs, running, where="post", color="tab:blue", label="greedy soup (running)")
    ax.plot([0], [ranked[0][1]], "o", color="tab:blue")
    for x, (_, score, status) in zip(xs[1:], tried):
        accepted = status == "accepted"
        ax.plot(
            x,
            score,
            "o" if accepted else "x",
            color="tab:green" if accepted else "tab:red",
            markersize=7,
        )
    ax.plot([], [], "o", color="tab:green", label="soup tried, kept")
    ax.plot([], [], "x", color="tab:red", label="soup tried, rejected")
    alone_scores = dict(alone)
    ax.plot(
        xs[1:],
        [alone_scores[label[2:]] for label, _, _ in tried],
        ".",
        color="grey",
        label="the added model alone",
    )
    ax.set_xticks(xs, labels=labels, rotation=30, ha="right")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Greedy soup: models tried best first, kept only if validation accuracy rises")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(figure, path)


def wise_ft_plot(
    curve: Sequence[tuple[float, float, float, float]], chosen: float, endpoint: str, path: Path
) -> Path:
    """Validation, test and shifted test accuracy along (1 - alpha) pre-trained + alpha
    fine-tuned; ``curve`` holds ``(alpha, validation, test, shifted test)``."""
    from matplotlib.figure import Figure

    alphas = [c[0] for c in curve]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(alphas, [c[1] for c in curve], "o-", label="validation (used to choose alpha)")
    ax.plot(alphas, [c[2] for c in curve], "s--", label="test (reported only)")
    ax.plot(alphas, [c[3] for c in curve], "^:", label="shifted test (reported only)")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen alpha = {chosen:.2g}")
    ax.set_xlabel(f"alpha (0: pre-trained, 1: {endpoint})")
    ax.set_ylabel("accuracy")
    ax.set_title("WiSE-FT: interpolating the pre-trained and the fine-tuned weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def dawin_plot(lambdas: Mapping[str, np.ndarray], endpoint: str, path: Path) -> Path:
    """Histograms of DaWin's per-input coefficient on the test and the shifted test split.

    Parameters
    ----------
    lambdas : mapping
        ``"test"`` and ``"shift"`` to the coefficient of each input (0: the
        pre-trained model, 1: ``endpoint``).
    endpoint : str
    path : Path
        The PNG to write.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = figure.add_subplot()
    bins = np.linspace(0.0, 1.0, 26)
    for key, label, color in (
        ("test", "test split", "tab:blue"),
        ("shift", "shifted test split", "tab:orange"),
    ):
        values = np.asarray(lambdas[key])
        ax.hist(
            values,
            bins=bins,
            alpha=0.55,
            color=color,
            label=f"{label} (mean {values.mean():.2f})",
        )
    ax.set_xlabel(f"lambda(x) (0: pre-trained, 1: {endpoint})")
    ax.set_ylabel("inputs")
    ax.set_title("DaWin: each input's interpolation coefficient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def per_task_plot(
    per_task: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: Path
) -> Path:
    """Grouped bars: test accuracy of each candidate on each task."""
    from matplotlib.figure import Figure

    names = list(per_task)
    width = 0.8 / len(tasks)
    figure = Figure(figsize=(8.0, 0.9 + 0.42 * len(names) * 1.2), layout="constrained")
    ax = figure.add_subplot()
    ys = np.arange(len(names))[::-1]
    for j, task in enumerate(tasks):
        ax.barh(
            ys + (len(tasks) / 2 - j - 0.5) * width,
            [per_task[n][task] for n in names],
            height=width,
            label=task,
        )
    ax.set_yticks(ys, labels=names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title("Multi-task scenario: accuracy per task")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncols=len(tasks))
    return _save(figure, path)


Panel = tuple[str, Mapping[str, Sequence[tuple[int, float, float]]], float | None]


def federated_rounds_figure(panels: Sequence[Panel]) -> Figure:
    """The figure of :func:`federated_rounds_plot`, not yet saved."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(panels), 3.9), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    markers = "osD^vP*X"
    for ax, (title, curves, local) in zip(axes, panels):
        for i, (name, curve) in enumerate(curves.items()):
            ax.plot(
                [r for r, _, _ in curve],
                [t for _, _, t in curve],
                marker=markers[i % len(markers)],
                markersize=3.5,
                linewidth=1.3,
                label=name,
            )
        if local is not None:
            ax.axhline(local, color="grey", linestyle=":", label="local models (own data only)")
        ax.set_title(title)
        ax.set_xlabel("round (0: the initial model)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("global model, pooled held-out accuracy")
    return figure


def federated_rounds_plot(panels: Sequence[Panel], path: Path) -> Path:
    """One panel per partition: the global model's held-out accuracy after each round, one
    line per aggregator, and a dotted line at the pooled accuracy of the local models.

    Parameters
    ----------
    panels : sequence of (title, curves, local accuracy)
        ``curves[aggregator]`` is a sequence of ``(round, validation accuracy,
        held-out accuracy)``; the held-out accuracy is drawn. ``local
        accuracy`` (or None) is drawn as a horizontal line.
    path : Path
        The PNG to write.
    """
    return _save(federated_rounds_figure(panels), path)
