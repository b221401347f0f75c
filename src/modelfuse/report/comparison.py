"""The report of a comparison of candidates: tables, forest plots, critical-difference diagram."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modelfuse.errors import OutputError
from modelfuse.report.document import Section, write_report
from modelfuse.report.plots import critical_difference_diagram, forest_plot
from modelfuse.report.results_json import write_results_json
from modelfuse.report.table import comparison_rows, format_number, format_pvalue

if TYPE_CHECKING:
    from modelfuse.evaluation.comparison import Comparison

__all__ = ["write_comparison_report"]


def write_comparison_report(
    comparison: Comparison,
    folder: str | Path,
    *,
    title: str | None = None,
    command: str = "",
    html_report: bool = True,
    files: dict[str, str] | None = None,
) -> list[Path]:
    """Write the figures and ``report.md`` / ``report.html`` of a comparison into a folder.

    Files: ``forest.png`` (each candidate's metric and interval, the
    reference's value dashed), ``differences.png`` (each difference to the
    reference and its paired interval, 0 dashed; two or more candidates),
    ``critical_difference.png`` (three or more candidates, when the Friedman
    test ran), ``results.json`` (every number, see
    :func:`~modelfuse.report.results_json.comparison_results`), ``report.md``
    and ``report.html``.

    Parameters
    ----------
    comparison : modelfuse.evaluation.Comparison
    folder : str or Path
        The folder to write into; created (with its parents) when missing.
    title : str, optional
    command : str
        The command line that produced the comparison, shown in the report.
    html_report : bool
    files : dict of str to str, optional
        The file each candidate was read from, recorded in ``results.json``.

    Returns
    -------
    list of Path
        Every file written.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from modelfuse.evaluation import compare_predictions
    >>> y = np.array([0, 1] * 50); p = np.eye(2)[y]
    >>> c = compare_predictions({"a": p, "b": p[::-1]}, y, n_resamples=50)
    >>> sorted(f.name for f in write_comparison_report(c, tempfile.mkdtemp()))
    ['differences.png', 'forest.png', 'report.html', 'report.md', 'results.json']
    """
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the report folder ({exc})") from None
    written: list[Path] = []
    level = f"{comparison.confidence_level:.0%}"
    models = comparison.models
    names = [c.label for c in models]
    reference = next(c for c in comparison.candidates if c.name == comparison.reference)
    written.append(
        forest_plot(
            names,
            [c.estimate.statistic for c in models],
            [c.estimate.ci for c in models],
            root / "forest.png",
            reference_value=reference.estimate.statistic,
            xlabel=f"{comparison.metric} ({level} {reference.estimate.method} interval)",
            title=f"{comparison.metric} of each candidate",
        )
    )
    others = [c for c in models if c.difference is not None]
    images = [("forest.png", f"{comparison.metric} with {level} intervals")]
    holm_consistent = comparison.intervals == "holm-consistent"
    if others:
        written.append(
            forest_plot(
                [c.label for c in others],
                [c.difference.statistic for c in others],
                [(c.adjusted_difference if holm_consistent else c.difference).ci for c in others],
                root / "differences.png",
                reference_value=0.0,
                xlabel=f"{comparison.metric} minus that of {comparison.reference}",
                title=f"difference to {comparison.reference} "
                + ("(Holm-consistent intervals)" if holm_consistent else f"({level} paired "
                   "intervals, unadjusted)"),
            )
        )
        images.append(("differences.png", f"differences to {comparison.reference}"))
    headers, rows = comparison_rows(comparison)
    better = "higher" if comparison.greater_is_better else "lower"
    intro = (
        f"{len(names)} candidates scored on the same {comparison.n_samples} samples by "
        f"{comparison.metric} ({better} is better). Intervals: {reference.estimate.method}, "
        f"{reference.estimate.n_resamples} resamples; differences to {comparison.reference} "
        "use paired resamples. p-values: "
        f"{comparison.test} test against {comparison.reference}, Holm-adjusted over "
        f"{comparison.family_size} comparison(s) (each distinct model once); "
        + (
            "the difference intervals are Holm-consistent: read off the same resamples as the "
            "p-value at the level of the model's Holm step, each excludes 0 exactly when the "
            f"verdict at alpha {comparison.alpha:g} is significant. "
            if holm_consistent
            else f"the {level} difference intervals are unadjusted; the Holm verdict beside "
            "them decides significance. "
        )
        + "Metrics and their intervals have 4 decimals, "
        "differences are signed with 4 decimals, p-values have 4 decimals (below 0.0001: "
        "<0.0001). Every number is also in results.json."
    )
    sections = [
        Section(
            "Results",
            (intro, *(f"Note: {n}" for n in comparison.notes)),
            table=(headers, rows),
            images=tuple(images),
            preformatted=command,
        )
    ]
    if comparison.friedman is not None:
        f = comparison.friedman
        ranks = dict(zip(f.compared, f.mean_ranks))
        written.append(
            critical_difference_diagram(
                ranks,
                f.critical_difference,
                root / "critical_difference.png",
                title=f"mean ranks over {f.n_blocks} blocks (Nemenyi CD, alpha={f.alpha})",
            )
        )
        sections.append(
            Section(
                "Ranking",
                (
                    f"The samples were cut into {f.n_blocks} disjoint blocks and the candidates "
                    f"ranked by {comparison.metric} in each (1 = best). Friedman chi2 = "
                    f"{format_number(f.statistic, 'statistic')} on {f.df} df, "
                    f"{format_pvalue(f.pvalue)}. Candidates joined by a bar differ by less "
                    "than Nemenyi's critical difference "
                    f"{format_number(f.critical_difference, 'rank')} at alpha = {f.alpha:g}.",
                ),
                table=(
                    ["model", "mean rank"],
                    [
                        [n, format_number(r, "rank")]
                        for n, r in sorted(ranks.items(), key=lambda kv: kv[1])
                    ],
                ),
                images=(("critical_difference.png", "critical-difference diagram"),),
            )
        )
    written.append(write_results_json(comparison, root / "results.json", files=files))
    md, page = write_report(
        root, title or f"Comparison by {comparison.metric}", sections, html_report=html_report
    )
    written.append(md)
    if page is not None:
        written.append(page)
    return written
