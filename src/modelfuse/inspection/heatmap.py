"""The heat map of an inspection: pairwise cosine and sign conflict per tensor group."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelfuse.errors import OutputError
from modelfuse.inspection.groups import short_label

if TYPE_CHECKING:
    from modelfuse.inspection.results import MergeInspection

__all__ = ["inspection_heatmap"]


def _short(label: str) -> str:
    name = short_label(label)
    return name if len(name) <= 24 else name[:21] + "..."


def inspection_heatmap(inspection: MergeInspection, path: str | Path, *, dpi: int = 110) -> Path:
    """Draw two heat maps into one PNG: rows are the scopes (overall, then each tensor group).

    Left: the cosine similarity of each pair of task vectors (diverging colours
    from -1 to 1). Right: each model's sign conflict, the fraction of its
    non-zero entries that TIES' election rejects (0 to 1). Each cell prints its
    value; each panel has its own colour bar, labelled with what it shows.

    Parameters
    ----------
    inspection : MergeInspection
    path : str or Path
        The PNG to write.
    dpi : int

    Returns
    -------
    Path

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modelfuse.inspection import inspect_merge
    >>> d = tempfile.mkdtemp()
    >>> for name, scale in [("base", 0.0), ("a", 0.1), ("b", 0.2)]:
    ...     save_file({"mlp.w": torch.ones(8, 8) + scale * torch.randn(8, 8)},
    ...               os.path.join(d, name + ".safetensors"))
    >>> path = lambda name: os.path.join(d, name + ".safetensors")
    >>> found = inspect_merge({"merge_method": "ties", "base_model": path("base"),
    ...                        "models": [path("a"), path("b")]})
    >>> inspection_heatmap(found, os.path.join(d, "map.png")).read_bytes()[:4] == b"\\x89PNG"
    True
    """
    from matplotlib.figure import Figure

    scopes = [("overall", inspection.overall), *inspection.groups.items()]
    labels = [_short(m) for m in inspection.models]
    n = len(labels)
    pairs = list(itertools.combinations(range(n), 2))
    cosine = np.array([[figures.cosine[i, j] for i, j in pairs] for _, figures in scopes]).reshape(
        len(scopes), len(pairs)
    )
    conflict = np.array([figures.conflict_per_model for _, figures in scopes]).reshape(
        len(scopes), n
    )
    width = 3.0 + 1.1 * (max(len(pairs), 1) + n)
    figure = Figure(figsize=(max(width, 7.0), 1.4 + 0.45 * len(scopes)))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(pairs), 1), n]})
    rows = [name for name, _ in scopes]
    densities = inspection.conflict_density
    at = f" at density {densities[0]:g}" if len(densities) == 1 else ""
    panels = [
        (
            left,
            cosine,
            [f"{labels[i]} / {labels[j]}" for i, j in pairs],
            "RdBu_r",
            (-1.0, 1.0),
            "cosine similarity of task vectors",
            "pairwise cosine",
        ),
        (
            right,
            conflict,
            labels,
            "Oranges",
            (0.0, 1.0),
            "fraction of non-zero entries rejected",
            f"sign conflict (TIES' election){at}",
        ),
    ]
    for axes, values, columns, cmap, (low, high), bar_label, title in panels:
        if values.size == 0:  # one model: no pairs
            axes.set_axis_off()
            axes.set_title(f"{title}: needs two models", fontsize=9)
            continue
        shown = np.ma.masked_invalid(values)
        image = axes.imshow(shown, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        axes.set_yticks(range(len(rows)), rows, fontsize=8)
        axes.set_title(title, fontsize=10)
        for r in range(values.shape[0]):
            for c in range(values.shape[1]):
                value = values[r, c]
                text = "-" if not np.isfinite(value) else f"{value:.2f}"
                axes.text(c, r, text, ha="center", va="center", fontsize=7)
        bar = figure.colorbar(image, ax=axes, fraction=0.08, pad=0.03)
        bar.set_label(bar_label, fontsize=7)
    figure.suptitle(
        f"task vectors of {inspection.method} (base {_short(inspection.base)})", fontsize=10
    )
    figure.tight_layout()
    out = Path(path)
    try:
        figure.savefig(out, dpi=dpi, format="png")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the heat map ({exc}); check the folder") from None
    return out
