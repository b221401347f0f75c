"""Writing the demo's report: figures, tables and sentences computed from the results.

Nothing in the report is fixed in advance: every number, every "better" or
"worse" and every headline sentence is computed from the run's results. A
method that loses to the best individual model is shown losing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelfuse.demo.evaluate import MetricRow, accuracy_of, probabilities, verdict
from modelfuse.demo.federated import FederatedStudy
from modelfuse.demo.multitask import MultiTaskStudy
from modelfuse.demo.settings import DemoSettings
from modelfuse.demo.soup import SoupStudy
from modelfuse.demo.zoo import Zoo

__all__ = ["DemoReport", "fmt", "fmt_ci", "headlines", "write_demo_report"]

TIMING_HEADING = "Time per stage"
"""The report section holding wall-clock times (the only part that varies between runs)."""


def fmt(value: float, digits: int = 4) -> str:
    """A number with a fixed number of decimals.

    Examples
    --------
    >>> fmt(0.96851)
    '0.9685'
    """
    return f"{value:.{digits}f}"


def fmt_ci(ci: tuple[float, float], digits: int = 4) -> str:
    """An interval as ``[low, high]``.

    Examples
    --------
    >>> fmt_ci((0.1, 0.25))
    '[0.1000, 0.2500]'
    """
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}"


def _p(p: float) -> str:
    return f"{p:.4f}"


def _networks(cost: int) -> str:
    return f"{cost} network{'s' if cost != 1 else ''}"


def _vs_reference(
    difference: tuple[float, tuple[float, float], float] | None, *, interval: bool
) -> list[str]:
    """Table cells of a difference to the reference: signed value, [interval,] Holm p; empty for
    the reference itself."""
    if difference is None:
        return ["", "", ""] if interval else ["", ""]
    value, ci, p = difference
    return [_signed(value), fmt_ci(ci), _p(p)] if interval else [_signed(value), _p(p)]


@dataclass(frozen=True)
class DemoReport:
    """What the report writer produced: the two report files, the figures and the headlines."""

    markdown: Path
    html: Path
    images: tuple[str, ...]
    headlines: tuple[str, ...]


def headlines(rows: Sequence[MetricRow], reference: str, scenario: str) -> list[str]:
    """Sentences that state the comparison with the reference as the numbers say it.

    Examples
    --------
    >>> ref = MetricRow("a", "individual", 1, "", {"accuracy": (0.9, (0.88, 0.92))}, {})
    >>> b = MetricRow("b", "merge", 1, "", {"accuracy": (0.8, (0.77, 0.83))},
    ...               {"accuracy": (-0.1, (-0.13, -0.07), 0.001)})
    >>> headlines([ref, b], "a", "soup")[2]
    'Significantly worse than a in accuracy (Holm-adjusted p < 0.05): b (-0.1000).'
    """
    ref = next(r for r in rows if r.name == reference)
    acc, ci = ref.metrics["accuracy"]
    out = [
        f"{scenario}: the reference is {reference}, the best individual model by validation "
        f"accuracy; its test accuracy is {fmt(acc)} {fmt_ci(ci)}."
    ]
    groups: dict[str, list[MetricRow]] = {
        "better": [],
        "worse": [],
        "no significant difference": [],
    }
    for row in rows:
        if row.name == reference:
            continue
        groups[verdict(row)].append(row)
    for label, members in (("better", groups["better"]), ("worse", groups["worse"])):
        if members:
            listed = ", ".join(
                f"{r.name} ({_signed(r.differences['accuracy'][0])})" for r in members
            )
            out.append(
                f"Significantly {label} than {reference} in accuracy (Holm-adjusted p < 0.05): "
                f"{listed}."
            )
        else:
            out.append(
                f"No candidate is significantly {label} than {reference} in accuracy "
                "(Holm-adjusted p < 0.05)."
            )
    if groups["no significant difference"]:
        out.append(
            "Not significantly different from the reference: "
            + ", ".join(r.name for r in groups["no significant difference"])
            + "."
        )
    top = max(rows, key=lambda r: r.metrics["accuracy"][0])
    out.append(
        f"Highest test accuracy: {top.name} with {fmt(top.metrics['accuracy'][0])} "
        f"(runs {_networks(top.cost)} per prediction)."
    )
    if "nll" in ref.metrics:
        best_nll = min(rows, key=lambda r: r.metrics["nll"][0])
        best_ece = min(rows, key=lambda r: r.metrics["ece"][0])
        out.append(
            f"Lowest test NLL: {best_nll.name} ({fmt(best_nll.metrics['nll'][0])}); lowest ECE: "
            f"{best_ece.name} ({fmt(best_ece.metrics['ece'][0])})."
        )
    return out


def _accuracy_table(rows: Sequence[MetricRow]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "method",
        "family",
        "networks run",
        "accuracy",
        "95% CI",
        "diff vs reference",
        "95% CI",
        "p (Holm)",
        "verdict",
    ]
    body = []
    for r in rows:
        acc, ci = r.metrics["accuracy"]
        body.append(
            [
                r.name,
                r.family,
                str(r.cost),
                fmt(acc),
                fmt_ci(ci),
                *_vs_reference(r.differences.get("accuracy"), interval=True),
                verdict(r),
            ]
        )
    return headers, body


def _probability_table(rows: Sequence[MetricRow]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "method",
        "NLL",
        "95% CI",
        "diff NLL",
        "p (Holm)",
        "ECE",
        "95% CI",
        "diff ECE",
        "p (Holm)",
    ]
    body = []
    for r in rows:
        cells = [r.name]
        for metric in ("nll", "ece"):
            value, ci = r.metrics[metric]
            cells += [
                fmt(value),
                fmt_ci(ci),
                *_vs_reference(r.differences.get(metric), interval=False),
            ]
        body.append(cells)
    return headers, body


def _zoo_table(
    zoo: Zoo, soup: SoupStudy, multitask: MultiTaskStudy, y_val: np.ndarray
) -> tuple[list[str], list[list[str]]]:
    val_acc = {e.name: accuracy_of(e.val, y_val) for e in soup.entries}
    n = len(y_val)
    for j, task in enumerate(multitask.tasks):  # each task model on its own task
        entry = next(e for e in multitask.entries if e.name == multitask.experts[task])
        val_acc[entry.name] = accuracy_of(entry.val[j * n : (j + 1) * n], y_val)
    headers = [
        "model",
        "trained on",
        "examples",
        "epochs",
        "lr",
        "weight decay",
        "augmentation",
        "seed",
        "validation accuracy (own task)",
    ]
    body = []
    for f in (zoo.pretrained, *zoo.soup, *zoo.tasks.values()):
        s = f.settings
        body.append(
            [
                f.name,
                s["data"],
                str(s["n_examples"]),
                str(s["epochs"]),
                f"{s['lr']:g}",
                f"{s['weight_decay']:g}",
                s["augment"],
                str(s["seed"]),
                fmt(val_acc[f.name]) if f.name in val_acc else "",
            ]
        )
    return headers, body


def _nested_table(choice: Any, lambdas: Sequence[float]) -> tuple[list[str], list[list[str]]]:
    nested = choice.nested
    headers = ["fold", "lambda chosen inside the fold", "accuracy on the untouched outer fold"]
    body = [
        [str(i + 1), f"{p['lambda']:g}", fmt(s)]
        for i, (p, s) in enumerate(zip(nested.best_params, nested.outer_scores))
    ]
    body.append(["mean", f"final: {choice.chosen['lambda']:g}", fmt(nested.statistic)])
    return headers, body


def _per_task_rows(multitask: MultiTaskStudy) -> list[list[str]]:
    tasks = multitask.tasks
    per_task = multitask.per_task
    own = {t: per_task[multitask.experts[t]][t] for t in tasks}
    rows = []
    for name, acc in per_task.items():
        cost = next(e.cost for e in multitask.entries if e.name == name)
        normalized = np.mean([acc[t] / own[t] if own[t] > 0 else np.nan for t in tasks])
        rows.append(
            [
                name,
                str(cost),
                *(fmt(acc[t]) for t in tasks),
                fmt(float(np.mean([acc[t] for t in tasks]))),
                fmt(float(normalized)),
            ]
        )
    return rows


def _forest(rows: Sequence[MetricRow], reference: str, path: Path, title: str) -> None:
    from modelfuse.report import forest_plot

    ref = next(r for r in rows if r.name == reference)
    forest_plot(
        [r.name for r in rows],
        [r.metrics["accuracy"][0] for r in rows],
        [r.metrics["accuracy"][1] for r in rows],
        path,
        reference_value=ref.metrics["accuracy"][0],
        xlabel="test accuracy, 95% CI (dashed: reference)",
        title=title,
    )


def _differences(rows: Sequence[MetricRow], reference: str, path: Path, title: str) -> None:
    from modelfuse.report import forest_plot

    others = [r for r in rows if "accuracy" in r.differences]
    forest_plot(
        [r.name for r in others],
        [r.differences["accuracy"][0] for r in others],
        [r.differences["accuracy"][1] for r in others],
        path,
        reference_value=0.0,
        xlabel=f"accuracy minus {reference}'s, paired 95% CI",
        title=title,
    )


def write_demo_report(
    folder: Path,
    *,
    settings: DemoSettings,
    seed: int,
    zoo: Zoo,
    soup: SoupStudy,
    soup_rows: Sequence[MetricRow],
    multitask: MultiTaskStudy,
    multitask_rows: Sequence[MetricRow],
    y_val: np.ndarray,
    y_test: np.ndarray,
    n_samples: Mapping[str, int],
    timings: Mapping[str, float],
    notes: Sequence[str],
    command: str,
    federated: FederatedStudy | None = None,
) -> DemoReport:
    """Draw every figure into ``folder`` and write ``report.md``, ``report.html`` and ``results.json``.

    ``federated`` is the federated scenario's study, or None when Flower's
    simulation engine is not installed (the report then says so).
    """
    from modelfuse.calibration.reliability import reliability_diagram
    from modelfuse.demo.plots import greedy_trace_plot, per_task_plot, wise_ft_plot
    from modelfuse.report import Section, write_report

    images: list[str] = []

    def image(name: str) -> Path:
        images.append(name)
        return folder / name

    k = len(zoo.soup)
    _forest(
        soup_rows,
        soup.reference,
        image("soup_accuracy.png"),
        "Soup scenario: test accuracy per method",
    )
    _differences(
        soup_rows,
        soup.reference,
        image("soup_differences.png"),
        f"Soup scenario: difference to {soup.reference}",
    )
    greedy_trace_plot(soup.greedy_trace, image("greedy_soup_trace.png"))
    wise_ft_plot(soup.wise_curve, soup.wise_alpha, soup.wise_endpoint, image("wise_ft_curve.png"))
    entries = {e.name: e for e in soup.entries}
    reliability: list[tuple[str, str]] = []
    for i, (before, after, _) in enumerate(soup.calibration):
        for tag, name in (("before", before), ("after", after)):
            file = f"reliability_{i + 1}_{tag}.png"
            reliability_diagram(
                probabilities(entries[name].test), y_test, image(file), title=f"{name} (test)"
            )
            reliability.append((file, f"Reliability diagram on the test split: {name}"))
    _forest(
        multitask_rows,
        multitask.reference,
        image("multitask_accuracy.png"),
        "Multi-task scenario: pooled test accuracy",
    )
    per_task_plot(multitask.per_task, multitask.tasks, image("multitask_per_task.png"))

    soup_lines = headlines(soup_rows, soup.reference, "Soup scenario")
    mt_lines = headlines(multitask_rows, multitask.reference, "Multi-task scenario")
    if federated is not None:
        from modelfuse.demo.federated_report import federated_report

        fed = federated_report(
            federated, n_resamples=settings.n_resamples, interval=settings.interval, image=image
        )
        fed_lines, fed_sections, fed_results = fed.headlines, fed.sections, fed.results
    else:
        fed_lines = [
            "Federated scenario: not run; Flower's simulation engine is not installed "
            "(pip install 'modelfuse[federated]')."
        ]
        fed_sections = [Section("Federated scenario", tuple(fed_lines))]
        fed_results = None
    mt_best = max(multitask_rows, key=lambda r: r.metrics["accuracy"][0])
    soup_by_name = {r.name: r for r in soup_rows}
    total = sum(timings.values())
    interval = {"bca": "BCa", "percentile": "percentile"}[settings.interval]
    sections = [
        Section(
            "Summary",
            (
                f"Settings: {settings.name} run, seed {seed}. Data: scikit-learn's digits "
                f"(8x8 images, 10 classes), stratified split into {n_samples['train']} training, "
                f"{n_samples['val']} validation and {n_samples['test']} test images. Every choice "
                "(hyperparameters, greedy soup, ensemble weights, temperatures, the reference "
                "model) uses the validation split; the test split is used once, for the tables "
                "below.",
                *soup_lines,
                *mt_lines,
                *fed_lines,
                f"Inference cost: every merge runs 1 network per prediction; the soft-voting "
                f"ensemble of the soup scenario runs {k}.",
            ),
            preformatted=command,
        ),
        Section(
            "Model zoo",
            (
                f"A {settings.hidden}-unit two-hidden-layer MLP (64 -> {settings.hidden} -> "
                f"{settings.hidden} -> 10) pre-trained on {zoo.pretrained.settings['n_examples']} "
                f"training images, then fine-tuned into {k} models on the whole training split "
                "with learning rate, weight decay, seed and augmentation drawn from the run's seed "
                f"(soup scenario), and into {len(zoo.tasks)} task models (multi-task scenario). "
                "Each is saved in models/ as a Hugging Face style folder (model.safetensors and "
                "config.json).",
            ),
            table=_zoo_table(zoo, soup, multitask, y_val),
        ),
        Section(
            "Soup scenario: accuracy",
            (
                f"Test accuracy of each method with its 95% {interval} bootstrap interval "
                f"({settings.n_resamples} resamples), its difference to the reference "
                f"{soup.reference} with a paired bootstrap interval, and the exact McNemar test "
                "against the reference, Holm-adjusted over all candidates. 'networks run' is "
                "the inference cost: 1 for one model or a merge, the number of members for an "
                "ensemble.",
            ),
            table=_accuracy_table(soup_rows),
            images=(
                ("soup_accuracy.png", "Test accuracy per method (95% bootstrap intervals)"),
                ("soup_differences.png", f"Accuracy difference to {soup.reference}"),
            ),
        ),
        Section(
            "Soup scenario: probabilities (NLL and ECE)",
            (
                "Negative log-likelihood and expected calibration error (15 equal-width bins, "
                f"top label) on the test split with 95% {interval} intervals; differences to the "
                "reference with Holm-adjusted p-values (paired permutation tests). Lower is "
                "better for both.",
            ),
            table=_probability_table(soup_rows),
        ),
        Section(
            "How each method was built",
            tuple(f"{r.name}: {r.details}." for r in soup_rows if r.family != "individual")
            + tuple(
                f"Merged through the file engine (modelfuse.merge on a YAML configuration; "
                f"paths relative to configs/): configs/{p.name} -> merges/{p.stem}/."
                for p in soup.configs
            ),
        ),
        Section(
            "Greedy soup",
            (
                "The fine-tunes are sorted by validation accuracy; the soup starts with the "
                "best and each next model is kept only if the soup's validation accuracy "
                f"strictly rises. Kept: {', '.join(soup.greedy_ingredients)}.",
            ),
            images=(("greedy_soup_trace.png", "Greedy soup trace (validation accuracy)"),),
        ),
        Section(
            "WiSE-FT",
            (
                f"(1 - alpha) x pre-trained + alpha x {soup.wise_endpoint}, swept over "
                f"{len(soup.wise_curve)} values of alpha; alpha {soup.wise_alpha:.2g} has the best "
                "validation accuracy (the smallest on ties). The test curve is shown for "
                "information only; it played no part in the choice.",
            ),
            table=(
                ["alpha", "validation accuracy", "test accuracy"],
                [[f"{a:.2f}", fmt(v), fmt(t)] for a, v, t in soup.wise_curve],
            ),
            images=(("wise_ft_curve.png", "WiSE-FT curve"),),
        ),
        Section(
            "Task arithmetic: lambda by nested cross-validation",
            (
                "Candidates lambda = "
                + ", ".join(f"{x:g}" for x in soup.lambdas)
                + " (scale of the mean task vector). Nested CV on the validation split "
                f"({settings.outer_splits} outer x {settings.inner_splits} inner stratified "
                "folds): in each outer fold lambda is chosen by inner CV and scored on the "
                "untouched outer fold; the mean outer score estimates how well the choosing "
                "procedure does. The final lambda is chosen by the same inner CV on the whole "
                "validation split.",
                f"Soup scenario: nested-CV estimate {fmt(soup.task_arithmetic.nested.statistic)} "
                f"{fmt_ci(soup.task_arithmetic.nested.ci)}, final lambda "
                f"{soup.task_arithmetic.chosen['lambda']:g}.",
            ),
            table=_nested_table(soup.task_arithmetic, soup.lambdas),
        ),
        Section(
            "Calibration: temperature scaling",
            tuple(
                f"{before} (the best {'merge' if i == 0 else 'ensemble'} by validation NLL): "
                f"temperature {t:.3g} fitted on the validation split; test ECE "
                f"{fmt(soup_by_name[before].metrics['ece'][0])} -> "
                f"{fmt(soup_by_name[after].metrics['ece'][0])}, "
                f"test NLL {fmt(soup_by_name[before].metrics['nll'][0])}"
                f" -> {fmt(soup_by_name[after].metrics['nll'][0])}."
                for i, (before, after, t) in enumerate(soup.calibration)
            ),
            images=tuple(reliability),
        ),
        Section(
            "Multi-task scenario: accuracy per task",
            (
                f"Tasks: {', '.join(multitask.tasks)} (same labels, transformed images). Each "
                "task model is fine-tuned from the pre-trained model on its task; merges "
                "combine all of them into one network. Test accuracy on each task's test "
                "images; 'mean' is the pooled accuracy; 'normalized mean' averages, over the "
                "tasks, the accuracy divided by that of the task's own model on its task (1 "
                "means as good as every task's own model).",
                f"Best pooled test accuracy: {mt_best.name} ({fmt(mt_best.metrics['accuracy'][0])}"
                f", {_networks(mt_best.cost)} per prediction).",
                f"Task arithmetic: lambda {multitask.task_arithmetic.chosen['lambda']:g} chosen "
                f"by CV on the pooled validation split; nested-CV estimate "
                f"{fmt(multitask.task_arithmetic.nested.statistic)} "
                f"{fmt_ci(multitask.task_arithmetic.nested.ci)}.",
            ),
            table=(
                ["method", "networks run", *multitask.tasks, "mean", "normalized mean"],
                _per_task_rows(multitask),
            ),
            images=(("multitask_per_task.png", "Accuracy per task"),),
        ),
        Section(
            "Multi-task scenario: comparison with the best task model",
            (
                f"Pooled test accuracy over all tasks ({len(multitask.y_test)} predictions) with "
                f"95% {interval} intervals, difference to {multitask.reference} (the task model with "
                "the best pooled validation accuracy) and exact McNemar tests, Holm-adjusted.",
                *mt_lines,
            ),
            table=_accuracy_table(multitask_rows),
            images=(("multitask_accuracy.png", "Pooled test accuracy per method"),),
        ),
        *fed_sections,
        Section(
            "Notes",
            tuple(notes) if notes else ("No warnings were raised during the run.",),
        ),
        Section(
            TIMING_HEADING,
            (
                f"Stages before this report: {total:.1f} s on this machine (torch with 1 "
                "thread); the terminal also shows the time spent writing the report.",
            ),
            table=(["stage", "seconds"], [[s, f"{t:.1f}"] for s, t in timings.items()]),
        ),
    ]
    md, _ = write_report(folder, "modelfuse demo: fusing models on real data", sections)
    results = {
        "format": "modelfuse-demo",
        "settings": settings.name,
        "seed": seed,
        "soup": {
            "reference": soup.reference,
            "rows": [_row_json(r) for r in soup_rows],
            "greedy_ingredients": list(soup.greedy_ingredients),
            "wise_ft": {"alpha": soup.wise_alpha, "curve": soup.wise_curve},
            "task_arithmetic_lambda": soup.task_arithmetic.chosen["lambda"],
            "caruana_weights": soup.caruana_weights,
        },
        "multitask": {
            "reference": multitask.reference,
            "rows": [_row_json(r) for r in multitask_rows],
            "per_task": multitask.per_task,
            "task_arithmetic_lambda": multitask.task_arithmetic.chosen["lambda"],
        },
        "federated": fed_results,
        "timings": dict(timings),
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return DemoReport(
        md, folder / "report.html", tuple(images), tuple(soup_lines + mt_lines + fed_lines)
    )


def _row_json(row: MetricRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "family": row.family,
        "networks_run": row.cost,
        "details": row.details,
        "metrics": {m: {"value": v, "ci": list(ci)} for m, (v, ci) in row.metrics.items()},
        "vs_reference": {
            m: {"difference": d, "ci": list(ci), "p_holm": p}
            for m, (d, ci, p) in row.differences.items()
        },
        "verdict": verdict(row),
    }
