"""A small report writer: report.md next to its PNGs, and a self-contained report.html.

A report is a title and a list of sections; each section has a heading,
paragraphs, an optional table and optional images. The Markdown links the
PNG files beside it; the HTML embeds them as base64 so it can be mailed or
archived as one file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelfuse.errors import DataError, OutputError
from modelfuse.report.table import format_table

__all__ = ["Section", "render_html", "render_markdown", "write_report"]


@dataclass(frozen=True)
class Section:
    """One section of a report.

    Attributes
    ----------
    heading : str
    paragraphs : tuple of str
        Plain text (escaped in HTML; used as is in Markdown).
    table : tuple (headers, rows) or None
    images : tuple of (file name, caption)
        PNG files in the report's folder.
    preformatted : str
        Text shown verbatim (a code block), e.g. a command line.
    align : tuple of {"left", "right"} or None
        Per table column; default: the first column left, the others right.
    """

    heading: str
    paragraphs: tuple[str, ...] = ()
    table: tuple[Sequence[str], Sequence[Sequence[object]]] | None = None
    images: tuple[tuple[str, str], ...] = ()
    preformatted: str = ""
    align: tuple[Literal["left", "right"], ...] | None = None


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The report as Markdown; images are linked by file name.

    Examples
    --------
    >>> print(render_markdown("T", [Section("S", ("hello",))]))
    # T
    <BLANKLINE>
    ## S
    <BLANKLINE>
    hello
    <BLANKLINE>
    """
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.preformatted:
            out += ["```", s.preformatted, "```", ""]
        if s.table is not None:
            headers, rows = s.table
            out += [format_table(headers, rows, style="markdown", align=s.align), ""]
        for name, caption in s.images:
            out += [f"![{caption}]({name})", ""]
    return "\n".join(out)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
    "padding:.3em .6em;text-align:right}td{white-space:nowrap}"
    "th:first-child,td:first-child{text-align:left}.l{text-align:left}"
    "img{max-width:100%}figcaption{color:#555;font-size:.9em}pre{background:#f5f5f5;"
    "padding:.6em;overflow-x:auto}"
)


def render_html(title: str, sections: Sequence[Section], folder: str | Path) -> str:
    """The report as one self-contained HTML page; images are embedded as base64.

    Parameters
    ----------
    title : str
    sections : sequence of Section
    folder : str or Path
        Where the sections' images are.

    Examples
    --------
    >>> "<h2>S</h2>" in render_html("T", [Section("S", ("a < b",))], ".")
    True
    """
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h2>{esc(s.heading)}</h2>")
        out.extend(f"<p>{esc(p)}</p>" for p in s.paragraphs)
        if s.preformatted:
            out.append(f"<pre>{esc(s.preformatted)}</pre>")
        if s.table is not None:
            headers, rows = s.table
            left = [a == "left" for a in s.align] if s.align else [False] * len(headers)
            tag = [' class="l"' if is_left else "" for is_left in left]
            out.append("<table><thead><tr>")
            out.extend(f"<th{t}>{esc(str(h))}</th>" for h, t in zip(headers, tag))
            out.append("</tr></thead><tbody>")
            for row in rows:
                cells = "".join(
                    f"<td{t}>{esc('' if v is None else str(v))}</td>" for v, t in zip(row, tag)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        for name, caption in s.images:
            image = Path(folder) / name
            if not image.is_file():
                raise DataError(f"{image}: image of section {s.heading!r} not found")
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    folder: str | Path, title: str, sections: Sequence[Section], *, html_report: bool = True
) -> tuple[Path, Path | None]:
    """Write ``report.md`` (and ``report.html``) into an existing folder.

    Parameters
    ----------
    folder : str or Path
        Holds the sections' images already; the reports are written beside them.
    title : str
    sections : sequence of Section
    html_report : bool
        Also write the self-contained ``report.html``.

    Returns
    -------
    (markdown path, html path or None)

    Examples
    --------
    >>> import tempfile
    >>> md, page = write_report(tempfile.mkdtemp(), "T", [Section("S", ("x",))])
    >>> md.name, page.name
    ('report.md', 'report.html')
    """
    root = Path(folder)
    if not root.is_dir():
        raise OutputError(f"{root}: not a folder; create it first")
    md = root / "report.md"
    page = root / "report.html" if html_report else None
    try:
        md.write_text(render_markdown(title, sections), encoding="utf-8")
        if page is not None:
            page.write_text(render_html(title, sections, root), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{root}: cannot write the report ({exc})") from None
    return md, page
