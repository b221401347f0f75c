"""Results tables as Markdown (for report.md) or aligned plain text (for the terminal)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from modelfuse.errors import ConfigError

if TYPE_CHECKING:
    from modelfuse.evaluation.comparison import Comparison

__all__ = ["TABLE_STYLES", "comparison_rows", "comparison_table", "format_table"]

TableStyle = Literal["markdown", "text"]
TABLE_STYLES = ("markdown", "text")


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


def _interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def comparison_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a :class:`~modelfuse.evaluation.Comparison`.

    Columns: candidate, the metric, its CI, the difference to the reference,
    the difference's CI, and the Holm-adjusted p-value.

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
    >>> headers, rows = comparison_rows(compare_predictions({"a": p, "b": p}, y, n_resamples=50))
    >>> headers[0], rows[0][0], rows[1][3]
    ('model', 'a (reference)', '+0')
    """
    level = f"{comparison.confidence_level:.0%}"
    headers = [
        "model",
        comparison.metric,
        f"{level} CI",
        f"diff vs {comparison.reference}",
        f"{level} CI of diff",
        "p (Holm)",
    ]
    rows = []
    for c in comparison.candidates:
        if c.difference is None:
            rows.append(
                [
                    f"{c.name} (reference)",
                    f"{c.estimate.statistic:.4g}",
                    _interval(c.estimate.ci),
                    "",
                    "",
                    "",
                ]
            )
        else:
            rows.append(
                [
                    c.name,
                    f"{c.estimate.statistic:.4g}",
                    _interval(c.estimate.ci),
                    f"{c.difference.statistic:+.4g}",
                    _interval(c.difference.ci),
                    _p(c.test.pvalue if c.test is not None else None),
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
    return format_table(headers, rows, style=style)
