"""Tables, plots and report files for people, shared by every command and the demo.

- :func:`format_table`, :func:`comparison_table`: Markdown or terminal tables;
- :func:`forest_plot`, :func:`critical_difference_diagram`: PNG figures;
- :func:`write_report` with :class:`Section`: ``report.md`` and a
  self-contained ``report.html``;
- :func:`format_number`, :data:`NUMBER_FORMATS`: one number format per kind of column;
- :func:`comparison_results`, :func:`write_results_json`: every number of a
  comparison as strict JSON;
- :func:`write_comparison_report`: all of it for a
  :class:`modelfuse.evaluation.Comparison`.
"""

from modelfuse.report.comparison import write_comparison_report
from modelfuse.report.document import Section, render_html, render_markdown, write_report
from modelfuse.report.plots import (
    critical_difference_diagram,
    forest_plot,
    significance_cliques,
)
from modelfuse.report.results_json import comparison_results, write_results_json
from modelfuse.report.table import (
    NUMBER_FORMATS,
    TABLE_STYLES,
    comparison_rows,
    comparison_table,
    format_number,
    format_pvalue,
    format_table,
    friedman_summary,
)

__all__ = [
    "NUMBER_FORMATS",
    "TABLE_STYLES",
    "Section",
    "comparison_results",
    "comparison_rows",
    "comparison_table",
    "critical_difference_diagram",
    "forest_plot",
    "format_number",
    "format_pvalue",
    "format_table",
    "friedman_summary",
    "render_html",
    "render_markdown",
    "significance_cliques",
    "write_comparison_report",
    "write_report",
    "write_results_json",
]
