"""The demo's closing lines in the terminal: a short results table, time per stage, the report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelfuse.demo.evaluate import verdict
from modelfuse.demo.report import fmt

if TYPE_CHECKING:
    from modelfuse.demo.run import DemoResult

__all__ = ["print_summary"]

_STYLE = {"better": "green", "worse": "red", "reference": "bold"}
_SHORT = {"no significant difference": "n.s.", "reference": "ref"}


def print_summary(console: Any, result: DemoResult) -> None:
    """Print the soup scenario's table, the multi-task, distilled-ensemble and federated
    headlines, stage times and the report path."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"Soup scenario: test and shifted test split (reference: {result.soup_reference})",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    widths = {
        "nets": 4,
        "test acc": 8,
        "diff": 7,
        "verdict": 7,
        "shifted acc": 11,
        "diff ": 7,
        "verdict ": 7,
    }
    # numbers never shrink; a long method name is cut to what is left of the line
    room = max(12, int(console.width) - sum(widths.values()) - 2 * len(widths) - 2)
    table.add_column("method", no_wrap=True, overflow="ellipsis", max_width=room)
    for header, width in widths.items():
        table.add_column(
            header.strip(),
            justify="left" if header.startswith("verdict") else "right",
            no_wrap=True,
            min_width=width,
        )
    shifted = {r.name: r for r in result.soup_shift_rows}
    for row in result.soup_rows:
        cells = [row.name, str(row.cost)]
        for r in (row, shifted.get(row.name)):
            if r is None:
                cells += ["", "", ""]
                continue
            diff = r.differences.get("accuracy")
            said = verdict(r)
            short = _SHORT.get(said, said)
            style = _STYLE.get(said, "")
            cells += [
                fmt(r.metrics["accuracy"][0]),
                "" if diff is None else f"{diff[0]:+.4f}",
                f"[{style}]{short}[/{style}]" if style else short,
            ]
        table.add_row(*cells)
    console.print(table)
    for line in result.headlines:
        if line.startswith("On the ") and " seeds: " in line:
            console.print(line)
    best = max(result.multitask_rows, key=lambda r: r.metrics["accuracy"][0])
    ref = next(r for r in result.multitask_rows if r.name == result.multitask_reference)
    console.print(
        f"Multi-task scenario (pooled test accuracy): best {best.name} "
        f"{fmt(best.metrics['accuracy'][0])} ({best.cost} net{'s' if best.cost != 1 else ''}); "
        f"best single task model {ref.name} {fmt(ref.metrics['accuracy'][0])}."
    )
    for line in result.headlines:  # what the distilled ensembles keep of their ensemble's gain
        if any(
            said in line
            for said in (
                ": the distilled ensemble keeps ",
                ": the distilled ensemble is more accurate than the ensemble itself",
                ": the ensemble is not more accurate than ",
            )
        ):
            console.print(line)
    if result.federated is not None:
        from modelfuse.demo.federated_report import federated_headlines

        for line in federated_headlines(result.federated):
            console.print(line)
    else:
        console.print(
            "Federated scenario: not run; Flower's simulation engine is not installed "
            "(pip install 'modelfuse[federated]')."
        )
    times = Table(title="Time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in result.timings.items():
        times.add_row(stage, f"{seconds:.1f}")
    times.add_row("[bold]total[/bold]", f"[bold]{sum(result.timings.values()):.1f}[/bold]")
    console.print(times)
    console.print(
        "verdict: better / worse = Holm-adjusted p <= 0.05 against the reference (paired "
        "bootstrap); n.s. = no significant difference. Intervals, NLL and ECE: see the report."
    )
    console.print(f"Report: {result.report} (and {result.html.name}, self-contained)")
