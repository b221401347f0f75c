"""Reliability diagram: accuracy against confidence per bin, with the gap and a histogram."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from modelfuse.calibration.metrics import calibration_bins, expected_calibration_error

__all__ = ["reliability_diagram"]


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    n_bins: int = 15,
    binning: Literal["uniform", "quantile"] = "uniform",
    title: str | None = None,
) -> Path:
    """Write a reliability diagram (PNG) of the top-label confidence.

    The upper panel draws, per bin, the accuracy as a bar, the gap to the
    bin's mean confidence as a hatched red bar, and the diagonal of perfect
    calibration; its legend gives the ECE. The lower panel is the histogram
    of confidences (share of samples per bin) with the mean confidence and
    the accuracy as vertical lines. Uses ``matplotlib.figure.Figure``
    directly (no pyplot state); the file is written beside its target and
    renamed into place.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    path : str or Path
        The PNG to write.
    n_bins : int, default 15
    binning : {"uniform", "quantile"}, default "uniform"
        As in :func:`~modelfuse.calibration.metrics.expected_calibration_error`.
    title : str, optional

    Returns
    -------
    Path
        ``path``.

    References
    ----------
    DeGroot, Fienberg. The comparison and evaluation of forecasters. 1983.
    Niculescu-Mizil, Caruana. Predicting good probabilities with supervised
    learning. ICML 2005.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> rng = np.random.default_rng(0)
    >>> p = rng.dirichlet(np.ones(3), size=200); y = rng.integers(0, 3, size=200)
    >>> out = reliability_diagram(p, y, os.path.join(tempfile.mkdtemp(), "r.png"))
    >>> out.suffix
    '.png'
    """
    from matplotlib.figure import Figure

    bins = calibration_bins(probs, labels, n_bins=n_bins, binning=binning)
    ece = expected_calibration_error(probs, labels, n_bins=n_bins, binning=binning)
    p = np.asarray(probs)
    mean_conf = float(p.max(axis=1).mean())
    accuracy = float((p.argmax(axis=1) == np.asarray(labels)).mean())
    if binning == "uniform":
        left, right = bins["lower"], bins["upper"]
    else:  # draw equal-mass bins over the span of their confidences
        edges = np.concatenate([[bins["lower"][0]], bins["upper"]])
        edges = np.where(np.isnan(edges), 1.0, edges)
        left, right = edges[:-1], edges[1:]
    width = np.maximum(right - left, 1e-3)
    nonempty = bins["count"] > 0

    fig = Figure(figsize=(5, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(
        left[nonempty],
        bins["accuracy"][nonempty],
        width=width[nonempty],
        align="edge",
        color="#4C72B0",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    gap = bins["confidence"] - bins["accuracy"]
    top.bar(
        left[nonempty],
        gap[nonempty],
        bottom=bins["accuracy"][nonempty],
        width=width[nonempty],
        align="edge",
        color="#DD8452",
        alpha=0.6,
        edgecolor="#C44E52",
        hatch="//",
        linewidth=0.5,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title or "Reliability diagram")
    top.legend(loc="upper left", title=f"ECE = {ece:.4f} ({n_bins} {binning} bins)")

    share = bins["count"] / bins["count"].sum()
    bottom.bar(
        left, share, width=width, align="edge", color="#8C8C8C", edgecolor="black", linewidth=0.5
    )
    bottom.axvline(accuracy, color="#4C72B0", linestyle="-", label=f"accuracy {accuracy:.3f}")
    bottom.axvline(
        mean_conf, color="#C44E52", linestyle="--", label=f"mean confidence {mean_conf:.3f}"
    )
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("share of samples")
    bottom.legend(loc="upper left", fontsize="small")

    target = Path(path)
    handle, tmp = tempfile.mkstemp(suffix=".png", dir=target.parent or ".", prefix=".tmp-")
    os.close(handle)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
