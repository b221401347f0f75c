"""Results tables as Markdown (for report.md) or aligned plain text (for the terminal)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from modelfuse.errors import ConfigError

if TYPE_CHECKING:
    from modelfuse.evaluation.comparison import Comparison
    from modelfuse.evaluation.results import FriedmanResult

__all__ = [
    "NUMBER_FORMATS",
    "TABLE_STYLES",
    "comparison_rows",
    "comparison_table",
    "format_number",
    "format_pvalue",
    "friedman_summary",
    "format_table",
]

TableStyle = Literal["markdown", "text"]
TABLE_STYLES = ("markdown", "text")

NumberKind = Literal["metric", "difference", "pvalue", "rank", "statistic"]
NUMBER_FORMATS: dict[str, str] = {
    "metric": ".4f",  # a metric and the bounds of its interval: 0.7680, [0.7400, 0.7940]
    "difference": "+.4f",  # a difference to the reference, signed: +0.0720, [+0.0320, +0.1090]
    "pvalue": ".4f",  # a p-value: 0.0020; below 0.0001 it prints as <0.0001, never 0.0000
    "rank": ".2f",  # a mean rank and the critical difference: 1.05
    "statistic": ".2f",  # a test statistic (Friedman's chi2): 19.16
}
"""One number format per kind of column, used by every comparison table and report.

Every number of one kind prints with the same number of decimals, so the
columns line up and are read the same way in the terminal, ``report.md`` and
``report.html``.
"""

SMALLEST_PVALUE = 1e-4


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _escape(text: str, markdown: bool) -> str:
    return text.replace("|", "\\|") if markdown else text


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    style: TableStyle = "markdown",
    align: Sequence[Literal["left", "right"]] | None = None,
) -> str:
    """Format rows under headers as a Markdown table or as aligned plain text.

    Parameters
    ----------
    headers : sequence of str
    rows : sequence of sequences
        Cells; floats print with 4 significant digits, ``None`` as empty.
    style : {"markdown", "text"}
    align : sequence of {"left", "right"}, optional
        Per column; default: the first column left, the others right.

    Returns
    -------
    str
        The table, lines joined by newlines, without a trailing newline.

    Examples
    --------
    >>> print(format_table(["model", "accuracy"], [["a", 0.91234], ["b", 0.8]]))
    | model | accuracy |
    | :---- | -------: |
    | a     |   0.9123 |
    | b     |      0.8 |
    """
    if style not in TABLE_STYLES:
        raise ConfigError(
            f"style: unknown table style {style!r}; expected one of {', '.join(TABLE_STYLES)}"
        )
    markdown = style == "markdown"
    headers = [_escape(str(h), markdown) for h in headers]
    cells = [[_escape(_cell(v), markdown) for v in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ConfigError(
                f"rows[{i}]: {len(row)} cells under {len(headers)} headers; expected equal"
            )
    if align is None:
        align = ["left"] + ["right"] * (len(headers) - 1)
    minimum = 3 if style == "markdown" else 1
    widths = [max([len(h), minimum, *(len(r[j]) for r in cells)]) for j, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if a == "left" else v.rjust(w) for v, w, a in zip(values, widths, align)
        ]
        if style == "markdown":
            return "| " + " | ".join(padded) + " |"
        return "  ".join(padded).rstrip()

    if style == "markdown":
        rule = [
            (":" + "-" * (w - 1)) if a == "left" else ("-" * (w - 1) + ":")
            for w, a in zip(widths, align)
        ]
        body = [line(headers), "| " + " | ".join(rule) + " |"]
    else:
        body = [line(headers), "  ".join("-" * w for w in widths)]
    body.extend(line(r) for r in cells)
    return "\n".join(body)


def format_number(value: float | None, kind: NumberKind) -> str:
    """``value`` in the format of its column kind (see :data:`NUMBER_FORMATS`).

    ``None`` prints as an empty cell; NaN and infinities as ``nan``, ``inf``,
    ``-inf``; p-values below 0.0001 as ``<0.0001``.

    Examples
    --------
    >>> format_number(0.768, "metric"), format_number(0.072, "difference")
    ('0.7680', '+0.0720')
    >>> format_number(3e-7, "pvalue"), format_number(0.002, "pvalue")
    ('<0.0001', '0.0020')
    """
    if kind not in NUMBER_FORMATS:
        raise ConfigError(
            f"kind: unknown number kind {kind!r}; expected one of {', '.join(NUMBER_FORMATS)}"
        )
    if value is None:
        return ""
    number = float(value)
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if kind == "pvalue" and number < SMALLEST_PVALUE:
        return "<0.0001"
    return format(number, NUMBER_FORMATS[kind])


def format_pvalue(pvalue: float | None) -> str:
    """A p-value in a sentence: ``p = 0.0123`` or ``p < 0.0001``.

    Examples
    --------
    >>> format_pvalue(0.01234), format_pvalue(1e-9)
    ('p = 0.0123', 'p < 0.0001')
    """
    text = format_number(pvalue, "pvalue")
    return f"p < {text[1:]}" if text.startswith("<") else f"p = {text}"


def _interval(ci: tuple[float, float] | None, kind: NumberKind) -> str:
    if ci is None:
        return ""
    return f"[{format_number(ci[0], kind)}, {format_number(ci[1], kind)}]"


def friedman_summary(friedman: FriedmanResult) -> str:
    """Friedman's test, then the mean ranks and Nemenyi's critical difference (two lines).

    Examples
    --------
    >>> from modelfuse.evaluation import friedman_test
    >>> import numpy as np
    >>> scores = np.array([[0.9, 0.8, 0.7]] * 6)
    >>> print(friedman_summary(friedman_test(scores, names=["c", "b", "a"])))
    Friedman test over 6 blocks: chi2 = 12.00 on 2 df, p = 0.0025
    mean ranks (1 = best): c 1.00, b 2.00, a 3.00; Nemenyi critical difference 1.35 at alpha 0.05
    """
    ranks = sorted(zip(friedman.compared, friedman.mean_ranks), key=lambda kv: kv[1])
    shown = ", ".join(f"{name} {format_number(rank, 'rank')}" for name, rank in ranks)
    return (
        f"Friedman test over {friedman.n_blocks} blocks: chi2 = "
        f"{format_number(friedman.statistic, 'statistic')} on {friedman.df} df, "
        f"{format_pvalue(friedman.pvalue)}\nmean ranks (1 = best): {shown}; Nemenyi critical "
        f"difference {format_number(friedman.critical_difference, 'rank')} at alpha "
        f"{friedman.alpha:g}"
    )


def _verdict(candidate: Any, greater_is_better: bool) -> str:
    if candidate.significant is None:
        return ""
    if not candidate.significant:
        return "not significant"
    return "better" if (candidate.difference.statistic > 0) == greater_is_better else "worse"


def comparison_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a :class:`~modelfuse.evaluation.Comparison`, one row per distinct model.

    Columns: the model (all names of identical candidates, ``a = b``), the
    metric, its CI, the difference to the reference, the difference's CI,
    the Holm-adjusted p-value and the Holm verdict at the comparison's
    ``alpha``. The difference's CI is the Holm-consistent interval (it
    excludes 0 exactly when the verdict is significant) with the bootstrap
    test, and the unadjusted paired interval otherwise; its header says
    which. Each column has one format (:data:`NUMBER_FORMATS`): metrics with
    4 decimals, differences signed with 4 decimals, p-values with 4 decimals
    or ``<0.0001``.

    Parameters
    ----------
    comparison : modelfuse.evaluation.Comparison

    Returns
    -------
    headers : list of str
    rows : list of list of str

    Examples
    --------
    >>> import numpy as np
    >>> from modelfuse.evaluation import compare_predictions
    >>> y = np.array([0, 1] * 50); p = np.eye(2)[y]
    >>> headers, rows = comparison_rows(compare_predictions({"a": p, "b": p[::-1]}, y))
    >>> headers[4], rows[0][0], rows[1][1], rows[1][3], rows[1][6]
    ('Holm-consistent CI of diff', 'a (reference)', '0.0000', '-1.0000', 'worse')
    """
    level = f"{comparison.confidence_level:.0%}"
    holm_consistent = comparison.intervals == "holm-consistent"
    alpha = comparison.alpha
    headers = [
        "model",
        comparison.metric,
        f"{level} CI",
        f"diff vs {comparison.reference}",
        "Holm-consistent CI of diff" if holm_consistent else f"{level} CI of diff (unadjusted)",
        "p (Holm)",
        f"Holm verdict (alpha {alpha:g})",
    ]
    rows = []
    for c in comparison.models:
        if c.difference is None:
            rows.append(
                [
                    f"{c.label} (reference)",
                    format_number(c.estimate.statistic, "metric"),
                    _interval(c.estimate.ci, "metric"),
                    "",
                    "",
                    "",
                    "",
                ]
            )
        else:
            shown = c.adjusted_difference if holm_consistent else c.difference
            rows.append(
                [
                    c.label,
                    format_number(c.estimate.statistic, "metric"),
                    _interval(c.estimate.ci, "metric"),
                    format_number(c.difference.statistic, "difference"),
                    _interval(shown.ci, "difference"),
                    format_number(c.test.pvalue if c.test is not None else None, "pvalue"),
                    _verdict(c, comparison.greater_is_better),
                ]
            )
    return headers, rows


def comparison_table(comparison: Comparison, *, style: TableStyle = "markdown") -> str:
    """A :class:`~modelfuse.evaluation.Comparison` as a table (see :func:`comparison_rows`).

    Parameters
    ----------
    comparison : modelfuse.evaluation.Comparison
    style : {"markdown", "text"}

    Returns
    -------
    str

    Examples
    --------
    >>> import numpy as np
    >>> from modelfuse.evaluation import compare_predictions
    >>> y = np.array([0, 1] * 50); p = np.eye(2)[y]
    >>> table = comparison_table(compare_predictions({"a": p, "b": p}, y, n_resamples=50))
    >>> table.splitlines()[0].split("|")[1].strip()
    'model'
    """
    headers, rows = comparison_rows(comparison)
    align: list[Literal["left", "right"]] = ["left"] + ["right"] * (len(headers) - 2) + ["left"]
    return format_table(headers, rows, style=style, align=align)
