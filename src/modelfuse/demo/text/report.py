"""The text study's report: ``report.md``, ``text-results.json`` and the console table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["papers_table", "print_table", "write_text_report"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def papers_table(table: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[str]:
    """Markdown lines: methods as rows, tasks as columns (test accuracy %), the average over
    tasks with its 95% interval and the normalised accuracy (merged / own fine-tune).

    Examples
    --------
    >>> row = {"name": "m", "tasks": {"a": {"accuracy": 0.5, "normalized": 0.625,
    ...        "significant": False}}, "mean_accuracy": 0.5, "mean_interval": (0.4, 0.6),
    ...        "mean_normalized": 0.625}
    >>> papers_table([row], ["a"])[2]
    '| m | 50.0 | 50.0 [40.0, 60.0] | 62.5 |'
    """
    lines = [
        "| method | " + " | ".join(tasks) + " | average (95% CI) | normalised average |",
        "|---|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    for row in table:
        cells = []
        for task in tasks:
            cell = row["tasks"][task]
            mark = "*" if cell.get("significant") else ""
            cells.append(f"{_pct(cell['accuracy'])}{mark}")
        low, high = row["mean_interval"]
        lines.append(
            f"| {row['name']} | " + " | ".join(cells)
            + f" | {_pct(row['mean_accuracy'])} [{_pct(low)}, {_pct(high)}]"
            + f" | {_pct(row['mean_normalized'])} |"
        )
    return lines


def _normalised_table(table: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for row in table:
        cells = [_pct(row["tasks"][t]["normalized"]) for t in tasks]
        lines.append(f"| {row['name']} | " + " | ".join(cells)
                     + f" | {_pct(row['mean_normalized'])} |")
    return lines


def _task_detail(result: Any, task: Any) -> list[str]:
    comparison = result.comparisons[task.name]
    lines = [
        f"### {task.name}",
        "",
        f"Reference (best single model on validation): **{comparison.reference}**. "
        f"{comparison.n_samples} test texts; {comparison.confidence_level:.0%} bootstrap "
        "intervals; paired bootstrap tests against the reference, Holm-adjusted over this "
        "task's candidates.",
        "",
        "| candidate | accuracy | 95% CI | minus reference | adjusted p | significant |",
        "|---|---:|---|---:|---:|---|",
    ]
    for line in comparison.candidates:
        low, high = line.estimate.ci
        diff = "" if line.difference is None else f"{100 * line.difference.statistic:+.1f}"
        p = "" if line.test is None else f"{line.test.pvalue:.4f}"
        sig = "" if line.significant is None else ("yes" if line.significant else "no")
        lines.append(
            f"| {line.label} | {_pct(line.estimate.statistic)} | [{_pct(low)}, {_pct(high)}] "
            f"| {diff} | {p} | {sig} |"
        )
    lines += ["", *[f"- {note}" for note in comparison.notes], ""]
    return lines


def write_text_report(
    folder: Path, result: Any, *, notes: Sequence[str], command: str
) -> Path:
    """Write ``report.md`` and ``text-results.json`` into ``folder``; returns the report's path."""
    import numpy as np

    settings = result.settings
    names = [t.name for t in result.tasks]
    lines = [
        "# modelfuse text study: one pretrained encoder, fine-tuned per task, merged",
        "",
        f"Command: `{command}`. Settings: {settings.name}. All numbers are test-split "
        "accuracies (%) unless said otherwise.",
        "",
        "## Tasks",
        "",
        "| task | classes | train | validation | test | texts and labels |",
        "|---|---|---:|---:|---:|---|",
    ]
    for task in result.tasks:
        lines.append(
            f"| {task.name} | {', '.join(task.classes)} | {task.size('train')} | "
            f"{task.size('val')} | {task.size('test')} | {task.description} |"
        )
    lines += [
        "",
        "## Fine-tunes",
        "",
        f"Each task: a `BertForSequenceClassification` with its own new head on the base "
        f"encoder (`models/base`), {settings.steps} AdamW steps of {settings.batch_size} "
        f"texts, learning rate {settings.learning_rate:g} decayed linearly, at most "
        f"{settings.max_length} tokens per text, the word-embedding table frozen; saved in "
        "`models/TASK/` (config.json, model.safetensors, tokenizer).",
        "",
    ]
    for task in result.tasks:
        losses = result.losses.get(task.name, [])
        if losses:
            lines.append(
                f"- {task.name}: training loss {np.mean(losses[:10]):.3f} over the first 10 "
                f"steps, {np.mean(losses[-10:]):.3f} over the last 10"
            )
    lines += ["", "## Candidates", ""]
    for c in result.candidates:
        where = f" Configuration: `{c.config}`." if c.config else ""
        lines.append(f"- **{c.name}**: {c.details}.{where}")
    lines += [
        "",
        "Every merge keeps each task's head (`heads: keep`, in `merges/NAME/heads/TASK/`) and "
        "matches the classifiers' `bert.` names to the base's (`allow_prefix: true`). Rerun one "
        "from this folder with `modelfuse merge configs/NAME.yaml merges/NAME --overwrite`.",
        "",
        "## Results",
        "",
        "Test accuracy (%) per task; `*` marks a Holm-significant difference from that task's "
        "best single model (chosen on validation). The average's interval resamples each "
        "task's test split independently. Normalised average: the mean over tasks of "
        "accuracy / the own fine-tune's accuracy.",
        "",
        *papers_table(result.table, names),
        "",
        "Normalised accuracy (%: candidate / own fine-tune) per task:",
        "",
        *_normalised_table(result.table, names),
        "",
    ]
    for task in result.tasks:
        lines += _task_detail(result, task)
    lines += [
        "## Time and memory",
        "",
        "| stage | seconds | peak resident memory so far (MB) |",
        "|---|---:|---:|",
    ]
    for stage, (seconds, peak) in result.stages.items():
        lines.append(f"| {stage} | {seconds:.1f} | {peak / 2**20:.0f} |")
    total = sum(s for s, _ in result.stages.values())
    lines += [f"| total (before the report) | {total:.1f} | |", ""]
    if notes:
        lines += ["## Warnings seen during the run", "", *[f"- {n}" for n in notes], ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    data = {
        "command": command,
        "seed": result.seed,
        "settings": settings.__dict__,
        "tasks": {
            t.name: {"classes": list(t.classes),
                     "sizes": {s: t.size(s) for s in ("train", "val", "test")},
                     "description": t.description}
            for t in result.tasks
        },
        "candidates": {c.name: {"family": c.family, "details": c.details, "config": c.config}
                       for c in result.candidates},
        "table": result.table,
        "stages": {k: {"seconds": s, "peak_rss_bytes": p} for k, (s, p) in result.stages.items()},
    }
    (folder / "text-results.json").write_text(
        json.dumps(data, indent=2, default=list), encoding="utf-8"
    )
    return report


def print_table(console: Any, result: Any) -> None:
    """The study's table on the console, and where the report is."""
    from rich.table import Table

    names = [t.name for t in result.tasks]
    table = Table(title="text study: test accuracy (%)")
    for column in ["method", *names, "average", "normalised"]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in result.table:
        table.add_row(
            row["name"],
            *[_pct(row["tasks"][t]["accuracy"]) for t in names],
            _pct(row["mean_accuracy"]),
            _pct(row["mean_normalized"]),
        )
    console.print(table)
    console.print(f"report: {result.report}")
