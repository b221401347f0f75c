"""Every number of a comparison as plain JSON (``results.json`` beside the report).

Strict JSON has no NaN or infinity: a non-finite number is written as
``null`` and a line of ``notes`` says which one it was, so a reader never
mistakes a missing number for a measured one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfuse.errors import OutputError

if TYPE_CHECKING:
    from modelfuse.evaluation.comparison import Comparison

__all__ = ["RESULTS_FORMAT", "comparison_results", "write_results_json"]

RESULTS_FORMAT = "modelfuse-comparison"


class _Numbers:
    """Turns numbers into JSON values, collecting a note for each non-finite one."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def __call__(self, value: float | None, where: str) -> float | None:
        if value is None:
            return None
        number = float(value)
        if math.isfinite(number):
            return number
        self.notes.append(f"{where} is {number} (not a JSON number); written as null")
        return None

    def pair(self, ci: tuple[float, float] | None, where: str) -> list[float | None] | None:
        if ci is None:
            return None
        return [self(ci[0], f"{where}[0]"), self(ci[1], f"{where}[1]")]


def comparison_results(
    comparison: Comparison, *, files: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every number of a comparison's table and ranking, as a JSON-ready mapping.

    Parameters
    ----------
    comparison : modelfuse.evaluation.Comparison
    files : dict of str to str, optional
        The file each candidate was read from, recorded beside its name.

    Returns
    -------
    dict
        ``format``, ``metric``, ``greater_is_better``, ``reference``,
        ``n_samples``, ``confidence_level``, ``interval_method``,
        ``n_resamples``, ``test``, ``test_method``, ``pvalue_adjustment``,
        ``alpha``, ``family_size``, ``n_test_resamples``, ``p_floor``,
        ``difference_intervals``, ``reference_rule``, ``leader``,
        ``findings`` (the comparison's notes for a reader),
        ``candidates`` (per candidate: ``name``, ``value``, ``interval``,
        ``difference``, ``difference_interval``, ``pvalue``,
        ``pvalue_adjusted``, ``statistic``, ``holm_consistent_interval``,
        ``holm_consistent_level``, ``significant``, ``same_as``; the
        reference's comparison entries are absent or ``null``), ``friedman``
        (or ``null``) and ``notes`` (non-finite numbers).
        Only finite floats, strings, booleans, integers and ``null``.

    Examples
    --------
    >>> import numpy as np
    >>> from modelfuse.evaluation import compare_predictions
    >>> y = np.array([0, 1] * 50); p = np.eye(2)[y]
    >>> r = comparison_results(compare_predictions({"a": p, "b": p[::-1]}, y, n_resamples=50))
    >>> r["reference"], r["candidates"][1]["value"], r["candidates"][1]["difference"]
    ('a', 0.0, -1.0)
    """
    number = _Numbers()
    reference = next(c for c in comparison.candidates if c.name == comparison.reference)
    candidates = []
    for i, c in enumerate(comparison.candidates):
        where = f"candidates[{i}] ({c.name})"
        row: dict[str, Any] = {"name": c.name}
        if files is not None and c.name in files:
            row["file"] = files[c.name]
        row["value"] = number(c.estimate.statistic, f"{where} value")
        row["interval"] = number.pair(c.estimate.ci, f"{where} interval")
        if c.difference is None:
            row.update(
                difference=None,
                difference_interval=None,
                pvalue=None,
                pvalue_adjusted=None,
                statistic=None,
            )
        else:
            row["difference"] = number(c.difference.statistic, f"{where} difference")
            row["difference_interval"] = number.pair(
                c.difference.ci, f"{where} difference_interval"
            )
            row["pvalue"] = number(c.raw_pvalue, f"{where} pvalue")
            test = c.test
            row["pvalue_adjusted"] = number(
                None if test is None else test.pvalue, f"{where} pvalue_adjusted"
            )
            row["statistic"] = number(
                None if test is None else test.statistic, f"{where} statistic"
            )
            adjusted = c.adjusted_difference
            row["holm_consistent_interval"] = (
                None if adjusted is None else number.pair(adjusted.ci, f"{where} holm interval")
            )
            row["holm_consistent_level"] = (
                None if adjusted is None else float(adjusted.confidence_level)
            )
            row["significant"] = c.significant
        row["same_as"] = list(c.same_as)
        candidates.append(row)
    first_test = next((c.test for c in comparison.candidates if c.test is not None), None)
    friedman = None
    if comparison.friedman is not None:
        f = comparison.friedman
        friedman = {
            "statistic": number(f.statistic, "friedman statistic"),
            "df": int(f.df),
            "pvalue": number(f.pvalue, "friedman pvalue"),
            "n_blocks": int(f.n_blocks),
            "mean_ranks": {
                name: number(rank, f"friedman mean_ranks {name}")
                for name, rank in zip(f.compared, f.mean_ranks)
            },
            "critical_difference": number(f.critical_difference, "friedman critical_difference"),
            "alpha": float(f.alpha),
        }
    return {
        "format": RESULTS_FORMAT,
        "metric": comparison.metric,
        "greater_is_better": bool(comparison.greater_is_better),
        "reference": comparison.reference,
        "n_samples": int(comparison.n_samples),
        "confidence_level": float(comparison.confidence_level),
        "interval_method": reference.estimate.method,
        "n_resamples": int(reference.estimate.n_resamples),
        "test": comparison.test,
        "test_method": None if first_test is None else first_test.method,
        "pvalue_adjustment": "holm",
        "alpha": float(comparison.alpha),
        "family_size": int(comparison.family_size),
        "n_test_resamples": comparison.n_test_resamples,
        "p_floor": number(comparison.p_floor, "p_floor"),
        "difference_intervals": comparison.intervals,
        "reference_rule": comparison.reference_rule,
        "leader": list(comparison.leader),
        "findings": list(comparison.notes),
        "candidates": candidates,
        "friedman": friedman,
        "notes": number.notes,
    }


def write_results_json(
    comparison: Comparison, path: str | Path, *, files: dict[str, str] | None = None
) -> Path:
    """Write :func:`comparison_results` to ``path`` as strict JSON (no NaN, no infinity).

    Examples
    --------
    >>> import json, tempfile, os, numpy as np
    >>> from modelfuse.evaluation import compare_predictions
    >>> y = np.array([0, 1] * 50); p = np.eye(2)[y]
    >>> c = compare_predictions({"a": p, "b": p}, y, n_resamples=50)
    >>> out = write_results_json(c, os.path.join(tempfile.mkdtemp(), "results.json"))
    >>> json.loads(out.read_text())["candidates"][0]["interval"]
    [1.0, 1.0]
    """
    target = Path(path)
    text = json.dumps(comparison_results(comparison, files=files), indent=2, allow_nan=False)
    try:
        target.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{target}: cannot write the results ({exc.strerror or exc})") from None
    return target
