"""Figures for people: a forest plot of intervals and a critical-difference diagram.

Both draw on a :class:`matplotlib.figure.Figure` (no pyplot global state) and
save a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelfuse.errors import DataError, OutputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["critical_difference_diagram", "forest_plot", "significance_cliques"]


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    try:
        figure.savefig(out, dpi=dpi, format="png")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the figure ({exc}); check the folder") from None
    return out


def forest_plot(
    names: Sequence[str],
    estimates: Sequence[float],
    intervals: Sequence[tuple[float, float]],
    path: str | Path,
    *,
    reference_value: float | None = None,
    xlabel: str = "",
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Draw a forest plot: one row per item, a point and its interval.

    Parameters
    ----------
    names : sequence of str
        One label per row, drawn top to bottom.
    estimates : sequence of float
    intervals : sequence of (low, high)
    path : str or Path
        Where to save the PNG.
    reference_value : float, optional
        A vertical dashed line (e.g. 0 for differences, or the reference's score).
    xlabel, title : str
    dpi : int

    Returns
    -------
    Path
        The written PNG.

    Examples
    --------
    >>> import tempfile, os
    >>> out = forest_plot(["a", "b"], [0.8, 0.85], [(0.75, 0.85), (0.8, 0.9)],
    ...                   os.path.join(tempfile.mkdtemp(), "forest.png"))
    >>> out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    from matplotlib.figure import Figure

    n = len(names)
    if not (n == len(estimates) == len(intervals)) or n == 0:
        raise DataError(
            f"forest_plot: {len(names)} names, {len(estimates)} estimates and "
            f"{len(intervals)} intervals; expected the same positive number of each"
        )
    lows = np.array([lo for lo, _ in intervals], dtype=float)
    highs = np.array([hi for _, hi in intervals], dtype=float)
    points = np.asarray(estimates, dtype=float)
    ys = np.arange(n)[::-1]
    figure = Figure(figsize=(6.4, 0.9 + 0.45 * n), layout="constrained")
    ax = figure.add_subplot()
    ax.hlines(ys, lows, highs, color="tab:blue", linewidth=2)
    ax.plot(points, ys, "o", color="tab:blue", markersize=6)
    if reference_value is not None:
        ax.axvline(reference_value, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(ys, labels=list(names))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, path, dpi)


def significance_cliques(
    ranks: Sequence[float], critical_difference: float
) -> list[tuple[int, int]]:
    """Maximal runs of sorted mean ranks whose spread is within the critical difference.

    Parameters
    ----------
    ranks : sequence of float
        Mean ranks sorted ascending.
    critical_difference : float

    Returns
    -------
    list of (first, last)
        Index ranges (inclusive) of candidates not significantly different;
        a range is dropped when another contains it, single candidates are omitted.

    Examples
    --------
    >>> significance_cliques([1.0, 1.5, 2.6, 3.0], 1.2)
    [(0, 1), (1, 2), (2, 3)]
    """
    r = np.asarray(ranks, dtype=float)
    spans = []
    for i in range(len(r)):
        j = int(np.searchsorted(r, r[i] + critical_difference, side="right")) - 1
        if j > i and not any(a <= i and j <= b for a, b in spans):
            spans.append((i, j))
    return spans


def critical_difference_diagram(
    mean_ranks: Mapping[str, float],
    critical_difference: float,
    path: str | Path,
    *,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Draw Demšar's critical-difference diagram of mean ranks.

    The rank axis runs from 1 (best, left) to k; each candidate points to its
    mean rank (the better half labelled on the left, the rest on the right);
    thick bars join candidates whose mean ranks differ by less than the
    critical difference, and a bar above the axis shows the CD itself.

    Parameters
    ----------
    mean_ranks : mapping of str to float
        Candidate name to mean rank (1 = best).
    critical_difference : float
        E.g. Nemenyi's, from :func:`modelfuse.evaluation.nemenyi_critical_difference`.
    path : str or Path
    title : str
    dpi : int

    Returns
    -------
    Path

    References
    ----------
    Demšar, "Statistical comparisons of classifiers over multiple data sets",
    JMLR 7 (2006), figure 1.

    Examples
    --------
    >>> import tempfile, os
    >>> out = critical_difference_diagram({"a": 1.2, "b": 2.1, "c": 2.7}, 1.05,
    ...                                   os.path.join(tempfile.mkdtemp(), "cd.png"))
    >>> out.stat().st_size > 0
    True
    """
    from matplotlib.figure import Figure

    if len(mean_ranks) < 2:
        raise DataError(f"mean_ranks: expected at least 2 candidates, got {len(mean_ranks)}")
    items = sorted(mean_ranks.items(), key=lambda kv: kv[1])
    names = [n for n, _ in items]
    ranks = np.array([r for _, r in items], dtype=float)
    k = len(items)
    half = (k + 1) // 2
    rows = max(half, k - half)
    height = 1.6 + 0.32 * rows
    figure = Figure(figsize=(7.0, height), layout="constrained")
    ax = figure.add_subplot()
    ax.set_xlim(0.0, k + 1.0)
    ax.set_ylim(-(rows + 1.2), 1.6)
    ax.axis("off")
    low, high = 1, max(k, int(np.ceil(ranks.max())))
    ax.set_xlim(low - 0.9 - 0.12 * k, high + 0.9 + 0.12 * k)
    ax.hlines(0, low, high, color="black", linewidth=1)
    for tick in range(low, high + 1):
        ax.vlines(tick, 0, 0.12, color="black", linewidth=1)
        ax.text(tick, 0.2, str(tick), ha="center", va="bottom", fontsize=9)
    # the critical difference, drawn from rank 1
    ax.hlines(1.1, low, low + critical_difference, color="black", linewidth=2)
    ax.text(
        low + critical_difference / 2,
        1.2,
        f"CD = {critical_difference:.3g}",
        ha="center",
        va="bottom",
        fontsize=9,
    )
    for i, (name, rank) in enumerate(zip(names, ranks)):
        if i < half:
            y = -(i + 1) * 0.8 - 0.4
            ax.plot([rank, rank, low - 0.2], [0, y, y], color="black", linewidth=0.8)
            ax.text(low - 0.25, y, f"{name} ({rank:.2f})", ha="right", va="center", fontsize=9)
        else:
            y = -(k - i) * 0.8 - 0.4
            ax.plot([rank, rank, high + 0.2], [0, y, y], color="black", linewidth=0.8)
            ax.text(high + 0.25, y, f"({rank:.2f}) {name}", ha="left", va="center", fontsize=9)
    for level, (a, b) in enumerate(significance_cliques(ranks, critical_difference)):
        y = -0.25 - 0.18 * level
        ax.hlines(y, ranks[a] - 0.03, ranks[b] + 0.03, color="tab:red", linewidth=3)
    if title:
        ax.set_title(title)
    return _save(figure, path, dpi)
