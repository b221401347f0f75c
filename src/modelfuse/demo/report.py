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

from modelfuse.demo.data import SHIFT
from modelfuse.demo.evaluate import (
    MetricRow,
    SplitComparison,
    accuracy_of,
    probabilities,
    verdict,
)
from modelfuse.demo.federated import FederatedStudy
from modelfuse.demo.multitask import MultiTaskStudy
from modelfuse.demo.seeds import SeedResult, seed_sentences, seed_table, summarize_seeds
from modelfuse.demo.settings import DemoSettings
from modelfuse.demo.soup import SoupStudy
from modelfuse.demo.zoo import Zoo

__all__ = [
    "DemoReport",
    "fmt",
    "fmt_ci",
    "headlines",
    "helps_sentences",
    "highest_sentence",
    "write_demo_report",
]

_METRIC_WORDS = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE"}
_GREATER = {"accuracy": True, "nll": False, "ece": False}

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


def highest_sentence(
    rows: Sequence[MetricRow], reference: str, metric: str = "accuracy", split: str = "test"
) -> str:
    """The best value of ``metric`` among ``rows``, said as what it is: a winner picked on the
    split it is scored on, whose edge over the reference is significant or not.

    Examples
    --------
    >>> ref = MetricRow("a", "individual", 1, "", {"accuracy": (0.90, (0.88, 0.92))}, {})
    >>> b = MetricRow("b", "merge", 1, "", {"accuracy": (0.91, (0.89, 0.93))},
    ...               {"accuracy": (0.01, (-0.01, 0.03), 0.4)})
    >>> highest_sentence([ref, b], "a")
    'Highest test accuracy: b (0.9100, 1 network per prediction), picked on the test split it is scored on; its edge over a (+0.0100) is not significant (Holm-adjusted p = 0.4000 > 0.05), so the test split does not show that b is better than a.'
    """
    greater = _GREATER[metric]
    word = ("Highest" if greater else "Lowest") + f" {split} {_METRIC_WORDS[metric]}"
    best_value = (max if greater else min)(r.metrics[metric][0] for r in rows)
    top = next(r for r in rows if r.metrics[metric][0] == best_value)
    head = (
        f"{word}: {top.name} ({fmt(best_value)}, {_networks(top.cost)}"
        f" per prediction), picked on the {split} split it is scored on"
    )
    if top.name == reference:
        return f"{head}; it is the reference itself."
    diff, _, p = top.differences[metric]
    if verdict(top, metric, greater_is_better=greater) == "better":
        return (
            f"{head}; its edge over {reference} ({_signed(diff)}) is significant "
            f"(Holm-adjusted p = {_p(p)} <= 0.05)."
        )
    return (
        f"{head}; its edge over {reference} ({_signed(diff)}) is not significant "
        f"(Holm-adjusted p = {_p(p)} > 0.05), so the {split} split does not show that "
        f"{top.name} is better than {reference}."
    )


def headlines(
    rows: Sequence[MetricRow],
    reference: str,
    scenario: str,
    *,
    split: str = "test",
    rule: str = "the best individual model by validation accuracy",
) -> list[str]:
    """Sentences that state the comparison with the reference as the numbers say it.

    Examples
    --------
    >>> ref = MetricRow("a", "individual", 1, "", {"accuracy": (0.9, (0.88, 0.92))}, {})
    >>> b = MetricRow("b", "merge", 1, "", {"accuracy": (0.8, (0.77, 0.83))},
    ...               {"accuracy": (-0.1, (-0.13, -0.07), 0.001)})
    >>> headlines([ref, b], "a", "soup")[2]
    'Significantly worse than a in test accuracy (Holm-adjusted p <= 0.05): b (-0.1000).'
    """
    ref = next(r for r in rows if r.name == reference)
    acc, ci = ref.metrics["accuracy"]
    out = [
        f"{scenario}: the reference is {reference}, {rule}; its {split} accuracy is "
        f"{fmt(acc)} {fmt_ci(ci)}."
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
                f"Significantly {label} than {reference} in {split} accuracy (Holm-adjusted "
                f"p <= 0.05): {listed}."
            )
        else:
            out.append(
                f"No candidate is significantly {label} than {reference} in {split} accuracy "
                "(Holm-adjusted p <= 0.05)."
            )
    if groups["no significant difference"]:
        out.append(
            f"Not significantly different from the reference in {split} accuracy: "
            + ", ".join(r.name for r in groups["no significant difference"])
            + "."
        )
    out.append(highest_sentence(rows, reference, "accuracy", split))
    if "nll" in ref.metrics:
        out.append(highest_sentence(rows, reference, "nll", split))
        out.append(highest_sentence(rows, reference, "ece", split))
    return out


def helps_sentences(
    test_rows: Sequence[MetricRow], shift_rows: Sequence[MetricRow], reference: str
) -> list[str]:
    """Where each fusion helps in accuracy: on both test splits, only in distribution, only
    under the shift, or on neither, from the two splits' Holm-adjusted verdicts.

    Examples
    --------
    >>> ref = MetricRow("a", "individual", 1, "", {"accuracy": (0.9, (0.88, 0.92))}, {})
    >>> b = MetricRow("b", "merge", 1, "", {"accuracy": (0.89, (0.86, 0.92))},
    ...               {"accuracy": (-0.01, (-0.03, 0.01), 0.5)})
    >>> c = MetricRow("b", "merge", 1, "", {"accuracy": (0.7, (0.6, 0.8))},
    ...               {"accuracy": (0.1, (0.05, 0.15), 0.001)})
    >>> helps_sentences([ref, b], [ref, c], "a")[2]
    'Helps only under the shift: b (test -0.0100, shifted +0.1000).'
    """
    shift = {r.name: r for r in shift_rows}
    classes: dict[str, list[str]] = {
        "both": [],
        "test": [],
        "shift": [],
        "hurts": [],
        "neither": [],
    }
    for row in test_rows:
        if row.name == reference or row.family == "individual":
            continue
        other = shift[row.name]
        a, b = verdict(row), verdict(other)
        said = (
            f"{row.name} (test {_signed(row.differences['accuracy'][0])}, shifted "
            f"{_signed(other.differences['accuracy'][0])})"
        )
        if a == "better" and b == "better":
            classes["both"].append(said)
        elif a == "better" and b != "worse":
            classes["test"].append(said)
        elif b == "better" and a != "worse":
            classes["shift"].append(said)
        elif "worse" in (a, b):
            classes["hurts"].append(said)
        else:
            classes["neither"].append(said)
    words = {
        "both": "Helps on both test splits",
        "test": "Helps only in distribution (test split)",
        "shift": "Helps only under the shift",
        "hurts": "Significantly worse on at least one split (and better on neither)",
        "neither": "No significant difference on either split",
    }
    return [
        f"{words[key]}: {', '.join(items) if items else 'none'}."
        for key, items in classes.items()
        if items or key in ("both", "test", "shift")
    ]


_LEFT, _RIGHT = "left", "right"


def _metric_table(
    rows: Sequence[MetricRow], metric: str, reference: str
) -> tuple[tuple[list[str], list[list[str]]], tuple[str, ...]]:
    """One metric of every row: value, its interval, the difference to the reference, the
    Holm-consistent interval of the difference, the Holm-adjusted p and the verdict."""
    word = _METRIC_WORDS[metric]
    headers = [
        "method",
        "family",
        "networks run",
        word,
        f"95% CI of {word}",
        f"difference to {reference}",
        "95% CI of the difference (Holm-consistent)",
        "p (Holm)",
        "verdict",
    ]
    body = []
    for r in rows:
        value, ci = r.metrics[metric]
        body.append(
            [
                r.name,
                r.family,
                str(r.cost),
                fmt(value),
                fmt_ci(ci),
                *_vs_reference(r.differences.get(metric), interval=True),
                verdict(r, metric, greater_is_better=_GREATER[metric]),
            ]
        )
    align = (_LEFT, _LEFT, *(_RIGHT,) * 6, _LEFT)
    return (headers, body), align


def _both_splits_table(
    test_rows: Sequence[MetricRow], shift_rows: Sequence[MetricRow], reference: str
) -> tuple[tuple[list[str], list[list[str]]], tuple[str, ...]]:
    shift = {r.name: r for r in shift_rows}
    headers = [
        "method",
        "networks run",
        "test accuracy",
        f"test: difference to {reference}",
        "test verdict",
        "shifted accuracy",
        f"shifted: difference to {reference}",
        "shifted verdict",
    ]
    body = []
    for r in test_rows:
        o = shift[r.name]
        cells = [r.name, str(r.cost)]
        for row in (r, o):
            diff = row.differences.get("accuracy")
            cells += [
                fmt(row.metrics["accuracy"][0]),
                "" if diff is None else _signed(diff[0]),
                verdict(row),
            ]
        body.append(cells)
    align = (_LEFT, _RIGHT, _RIGHT, _RIGHT, _LEFT, _RIGHT, _RIGHT, _LEFT)
    return (headers, body), align


def _statistics_notes(
    comparison: SplitComparison, where: str, metric_shown: str | None = None
) -> tuple[str, ...]:
    """The comparison's notes a reader needs (floors, fall-backs) on ``metric_shown`` (all
    when None), naming the scenario and split; the leader notes are said by the headline
    sentences instead."""
    out = []
    for note in comparison.notes:
        metric, _, text = note.partition(": ")
        if text.startswith(("highest", "lowest")):
            continue
        if metric_shown is not None and metric != metric_shown:
            continue
        out.append(f"{where}, {_METRIC_WORDS.get(metric, metric)}: {text}.")
    return tuple(out)


def _tests_paragraph(comparison: SplitComparison, interval: str, n_resamples: int) -> str:
    floor = comparison.p_floor
    floor_text = (
        f"the smallest Holm-adjusted p-value they can give is {floor:.4f}, far below 0.05"
        if floor is not None and floor <= 0.005
        else (
            f"the smallest Holm-adjusted p-value they can give is {floor:.4f}"
            if floor is not None
            else "no p-value floor applies"
        )
    )
    return (
        f"Intervals of each metric: 95% {interval} bootstrap ({n_resamples} resamples; "
        "percentile where BCa is unstable, noted below). Each candidate's difference to the "
        f"reference is tested by a paired bootstrap of {comparison.n_test_resamples} resamples, "
        f"Holm-adjusted over the {comparison.family_size} distinct models ({floor_text}). The "
        "interval of the difference is the Holm-consistent one read off the same resamples: it "
        "excludes 0 exactly when the Holm-adjusted p is at most 0.05, so interval and verdict "
        "always agree; an end the resamples cannot resolve at the Holm level is shown as inf or "
        "-inf. Models with identical predictions share one row (names joined by '=') and count "
        "once."
    )


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


def _forest(
    rows: Sequence[MetricRow], reference: str, path: Path, title: str, split: str = "test"
) -> None:
    from modelfuse.report import forest_plot

    ref = next(r for r in rows if r.name == reference)
    forest_plot(
        [r.name for r in rows],
        [r.metrics["accuracy"][0] for r in rows],
        [r.metrics["accuracy"][1] for r in rows],
        path,
        reference_value=ref.metrics["accuracy"][0],
        xlabel=f"{split} accuracy, 95% CI (dashed: {reference})",
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
        xlabel=f"accuracy minus {reference}'s, Holm-consistent 95% CI",
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
    soup_shift: SplitComparison,
    soup_test_notes: Sequence[str],
    soup_reference: str,
    multitask: MultiTaskStudy,
    multitask_rows: Sequence[MetricRow],
    multitask_reference: str,
    multitask_notes: Sequence[str],
    y_val: np.ndarray,
    y_test: np.ndarray,
    n_samples: Mapping[str, int],
    timings: Mapping[str, float],
    notes: Sequence[str],
    command: str,
    federated: FederatedStudy | None = None,
    seeds: Sequence[SeedResult] = (),
) -> DemoReport:
    """Draw every figure into ``folder`` and write ``report.md``, ``report.html`` and ``results.json``.

    ``soup_rows`` and ``soup_shift`` are the soup scenario's comparisons on the
    test and the shifted test split (one row per distinct model; the
    reference row is ``soup_reference``); ``soup_test_notes`` the test
    comparison's notes. ``seeds`` holds the soup scenario of every seed
    when more than one ran. ``federated`` is the federated scenario's study,
    or None when Flower's simulation engine is not installed (the report
    then says so).
    """
    from modelfuse.calibration.reliability import reliability_diagram
    from modelfuse.demo.plots import dawin_plot, greedy_trace_plot, per_task_plot, wise_ft_plot
    from modelfuse.report import Section, write_report

    images: list[str] = []

    def image(name: str) -> Path:
        images.append(name)
        return folder / name

    k = len(zoo.soup)
    shift_rows = soup_shift.rows
    test_cmp = SplitComparison(
        list(soup_rows),
        tuple(soup_test_notes),
        soup_shift.family_size,
        soup_shift.n_test_resamples,
        soup_shift.p_floor,
    )
    ref = soup_reference
    _forest(soup_rows, ref, image("soup_accuracy.png"), "Soup scenario: test accuracy per method")
    _forest(
        shift_rows,
        ref,
        image("soup_shift_accuracy.png"),
        f"Soup scenario: shifted test accuracy per method ({SHIFT})",
        split="shifted test",
    )
    _differences(
        soup_rows,
        ref,
        image("soup_differences.png"),
        f"Soup scenario, test split: difference to {ref}",
    )
    _differences(
        shift_rows,
        ref,
        image("soup_shift_differences.png"),
        f"Soup scenario, shifted test split: difference to {ref}",
    )
    greedy_trace_plot(soup.greedy_trace, image("greedy_soup_trace.png"))
    wise_ft_plot(soup.wise_curve, soup.wise_alpha, soup.wise_endpoint, image("wise_ft_curve.png"))
    dawin_plot(soup.dawin.lambdas, soup.dawin.endpoint, image("dawin_lambdas.png"))
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
        multitask_reference,
        image("multitask_accuracy.png"),
        "Multi-task scenario: pooled test accuracy",
    )
    per_task_plot(multitask.per_task, multitask.tasks, image("multitask_per_task.png"))

    rule = f"chosen as {soup.reference_rule}"
    soup_lines = headlines(soup_rows, ref, "Soup scenario, test split", rule=rule)
    shift_lines = headlines(
        shift_rows, ref, f"Soup scenario, shifted test split ({SHIFT})", split="shifted", rule=rule
    )
    helps = helps_sentences(soup_rows, shift_rows, ref)
    mt_lines = headlines(
        multitask_rows,
        multitask_reference,
        "Multi-task scenario",
        split="pooled test",
        rule="the task model with the best pooled validation accuracy (ties: lower validation NLL)",
    )
    seed_lines: list[str] = []
    seed_summaries = []
    if len(seeds) > 1:
        methods = [
            e.name
            for e in soup.entries
            if e.family in ("merge", "ensemble", "distilled") or e.name == "pre-trained"
        ]
        seed_summaries = summarize_seeds(seeds, methods)
        seed_lines = seed_sentences(seed_summaries, len(seeds))
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
    from modelfuse.demo.ensemble_report import ensemble_report

    ens = ensemble_report(
        soup_entries=soup.entries,
        soup_rows=soup_rows,
        soup_shift_rows=shift_rows,
        soup_distilled=soup.distilled,
        soup_reference=soup.reference,
        caruana_weights=soup.caruana_weights,
        n_soup=k,
        y_test=y_test,
        multitask_entries=multitask.entries,
        multitask_rows=multitask_rows,
        multitask_distilled=multitask.distilled,
        multitask_y_test=multitask.y_test,
        n_tasks=len(multitask.tasks),
        shift_label=SHIFT,
        n_resamples=settings.n_resamples,
        interval=settings.interval,
        seed=seed,
        image=image,
    )
    soup_by_name = {r.name: r for r in soup_rows}
    label_of = {name: r.name for r in soup_rows for name in r.name.split(" = ")}
    total = sum(timings.values())
    interval = {"bca": "BCa", "percentile": "percentile"}[settings.interval]
    seeds_text = (
        f"seed {seed}"
        if len(seeds) <= 1
        else f"seeds {', '.join(str(r.seed) for r in seeds)} (the full study on seed {seed}, "
        "the soup scenario on every seed)"
    )
    wise_at = next(c for c in soup.wise_curve if c[0] == soup.wise_alpha)
    dawin_row = soup_by_name[label_of["DaWin"]]
    dawin_shift = next(r for r in shift_rows if r.name == dawin_row.name)
    lam = soup.dawin.lambdas
    table_sections = []
    for metric in ("accuracy", "nll", "ece"):
        for split_name, comparison, rows in (
            ("test split", test_cmp, soup_rows),
            (f"shifted test split ({SHIFT})", soup_shift, shift_rows),
        ):
            table, align = _metric_table(rows, metric, ref)
            word = _METRIC_WORDS[metric]
            lower = "" if metric == "accuracy" else " Lower is better."
            extra = (
                " ECE: 15 equal-width bins of the top label's probability."
                if metric == "ece"
                else ""
            )
            table_sections.append(
                Section(
                    f"Soup scenario, {split_name}: {word}",
                    (
                        f"{word[0].upper()}{word[1:]} of each method on the {split_name} "
                        f"({n_samples['test']} images) "
                        f"against the reference {ref}.{lower}{extra}",
                        _tests_paragraph(comparison, interval, settings.n_resamples),
                        *_statistics_notes(comparison, f"Soup scenario, {split_name}", metric),
                    ),
                    table=table,
                    align=align,
                    images=(
                        (
                            (
                                ("soup_accuracy.png", "Test accuracy per method (95% intervals)"),
                                ("soup_differences.png", f"Test accuracy difference to {ref}"),
                            )
                            if split_name == "test split"
                            else (
                                (
                                    "soup_shift_accuracy.png",
                                    "Shifted test accuracy per method (95% intervals)",
                                ),
                                (
                                    "soup_shift_differences.png",
                                    f"Shifted test accuracy difference to {ref}",
                                ),
                            )
                        )
                        if metric == "accuracy"
                        else ()
                    ),
                )
            )
    both_table, both_align = _both_splits_table(soup_rows, shift_rows, ref)
    seed_sections = []
    if seed_summaries:
        for split, label in (("test", "test split"), ("shift", "shifted test split")):
            headers, body, align = seed_table(seed_summaries, split)
            seed_sections.append(
                Section(
                    f"Soup scenario across seeds: {label}",
                    (
                        f"The soup scenario on each of {len(seeds)} seeds (each seed draws its "
                        "own split, fine-tunes and resamples): each method's accuracy on the "
                        f"{label}, its mean and standard deviation across seeds, its difference "
                        "to that seed's reference, and on how many seeds it was significantly "
                        "better or worse (Holm-adjusted paired bootstrap, 0.05) or the same "
                        "model as the reference. Calibrated candidates are left out (a "
                        "different model per seed).",
                        *(line for line in seed_lines if line.startswith(f"On the {label},")),
                    ),
                    table=(headers, body),
                    align=tuple(align),  # type: ignore[arg-type]
                )
            )
    sections = [
        Section(
            "Summary",
            (
                f"Settings: {settings.name} run, {seeds_text}. Data: scikit-learn's digits "
                f"(8x8 images, 10 classes), stratified split into {n_samples['train']} training, "
                f"{n_samples['val']} validation and {n_samples['test']} test images; the soup "
                f"scenario is also scored on a shifted test split: the test images {SHIFT}, a "
                "shift no model saw in training. Every choice (hyperparameters, greedy soup, "
                "ensemble weights, temperatures, AdaMerging's coefficients, the reference "
                "model) uses the validation split; the test splits are used once, for the "
                "tables below.",
                *soup_lines,
                *shift_lines,
                "Where fusion helps (soup scenario, accuracy against "
                f"{ref}, Holm-adjusted on each split):",
                *helps,
                *seed_lines,
                *mt_lines,
                "Distilled ensembles (one network trained to reproduce the soft vote, started "
                "from the best merge):",
                *ens.headlines,
                *fed_lines,
                f"Inference cost: every merge runs 1 network per prediction; DaWin runs 3 "
                f"(both endpoints, then each input's interpolation); the soft-voting ensemble "
                f"of the soup scenario runs {k}, the distilled ensembles 1.",
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
            align=(_LEFT, _LEFT, *(_RIGHT,) * 4, _LEFT, _RIGHT, _RIGHT),
        ),
        Section(
            "Soup scenario: both test splits at a glance",
            (
                f"Accuracy of each method on the test split and on the shifted test split "
                f"({SHIFT}), with its difference to the reference {ref} ({soup.reference_rule}) "
                "and the Holm-adjusted verdict of each split. Details and intervals follow.",
                *helps,
            ),
            table=both_table,
            align=both_align,
        ),
        *table_sections,
        *ens.sections,
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
                "validation accuracy (the smallest on ties). The test and shifted test curves "
                "are shown for information only; they played no part in the choice. At the "
                f"chosen alpha: test {fmt(wise_at[2])}, shifted {fmt(wise_at[3])}; at alpha 1 "
                f"({soup.wise_endpoint} alone): test {fmt(soup.wise_curve[-1][2])}, shifted "
                f"{fmt(soup.wise_curve[-1][3])}.",
            ),
            table=(
                ["alpha", "validation accuracy", "test accuracy", "shifted test accuracy"],
                [[f"{a:.2f}", fmt(v), fmt(t), fmt(sh)] for a, v, t, sh in soup.wise_curve],
            ),
            images=(("wise_ft_curve.png", "WiSE-FT curve on the validation and both test splits"),),
        ),
        Section(
            "DaWin: an interpolation per input",
            (
                f"DaWin interpolates the pre-trained model and {soup.dawin.endpoint} separately "
                "for each input: lambda(x) = exp(-H_ft) / (exp(-H_pre) + exp(-H_ft)), with H "
                "the entropy of each endpoint's prediction, so the more confident endpoint "
                "weighs more. Nothing is fitted (no labels are used). Mean lambda: validation "
                f"{lam['val'].mean():.3f}, test {lam['test'].mean():.3f}, shifted "
                f"{lam['shift'].mean():.3f}. Accuracy: test "
                f"{fmt(dawin_row.metrics['accuracy'][0])} ({verdict(dawin_row)} against {ref}), "
                f"shifted {fmt(dawin_shift.metrics['accuracy'][0])} ({verdict(dawin_shift)}).",
            ),
            images=(("dawin_lambdas.png", "DaWin's per-input coefficient on both test splits"),),
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
                f"{before} (the best {'merge' if i == 0 else 'ensemble'} by validation NLL, "
                "copies of a fine-tune left out): "
                f"temperature {t:.3g} fitted on the validation split; test ECE "
                f"{fmt(soup_by_name[label_of[before]].metrics['ece'][0])} -> "
                f"{fmt(soup_by_name[label_of[after]].metrics['ece'][0])}, "
                f"test NLL {fmt(soup_by_name[label_of[before]].metrics['nll'][0])}"
                f" -> {fmt(soup_by_name[label_of[after]].metrics['nll'][0])}."
                for i, (before, after, t) in enumerate(soup.calibration)
            )
            or ("Every merge and ensemble is a copy of a fine-tune: nothing was calibrated.",),
            images=tuple(reliability),
        ),
        *seed_sections,
        Section(
            "Multi-task scenario: accuracy per task",
            (
                f"Tasks: {', '.join(multitask.tasks)} (same labels, transformed images). Each "
                "task model is fine-tuned from the pre-trained model on its task; merges "
                "combine all of them into one network. Test accuracy on each task's test "
                "images; 'mean' is the pooled accuracy; 'normalized mean' averages, over the "
                "tasks, the accuracy divided by that of the task's own model on its task (1 "
                "means as good as every task's own model).",
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
                f"Pooled test accuracy over all tasks ({len(multitask.y_test)} predictions of "
                f"{len(multitask.y_test) // max(1, len(multitask.tasks))} images, one view per "
                f"task) with 95% {interval} intervals and the difference to "
                f"{multitask_reference}. The {len(multitask.tasks)} views of one image are not "
                "independent: intervals and the paired bootstrap tests resample whole images "
                "(a cluster bootstrap), Holm-adjusted over the distinct models, and the "
                "interval of the difference is Holm-consistent.",
                *mt_lines,
                *(
                    f"Multi-task scenario, pooled accuracy: {n.partition(': ')[2]}."
                    for n in multitask_notes
                    if not n.partition(": ")[2].startswith(("highest", "lowest"))
                ),
            ),
            table=_metric_table(multitask_rows, "accuracy", multitask_reference)[0],
            align=_metric_table(multitask_rows, "accuracy", multitask_reference)[1],
            images=(("multitask_accuracy.png", "Pooled test accuracy per method"),),
        ),
        *fed_sections,
        Section(
            "Notes",
            tuple(_reader_note(n) for n in notes)
            if notes
            else ("No warnings were raised during the run.",),
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
        "seeds": [r.seed for r in seeds] if seeds else [seed],
        "soup": {
            "reference": ref,
            "reference_rule": soup.reference_rule,
            "rows": [_row_json(r) for r in soup_rows],
            "shifted": {
                "shift": SHIFT,
                "rows": [_row_json(r) for r in shift_rows],
            },
            "where_fusion_helps": helps,
            "greedy_ingredients": list(soup.greedy_ingredients),
            "wise_ft": {
                "alpha": soup.wise_alpha,
                "curve": [
                    {"alpha": a, "val": v, "test": t, "shifted": sh}
                    for a, v, t, sh in soup.wise_curve
                ],
            },
            "dawin": {k2: float(v.mean()) for k2, v in lam.items()},
            "adamerging_lambdas": list(soup.adamerging_lambdas),
            "gradient_matching_prior_scale": soup.prior_scale,
            "gradient_matching_prior": (
                "pre-trained model's Fisher" if soup.prior_scale is None else "scalar"
            ),
            "task_arithmetic_lambda": soup.task_arithmetic.chosen["lambda"],
            "caruana_weights": soup.caruana_weights,
        },
        "across_seeds": [
            {
                "method": s.method,
                "split": s.split,
                "accuracies": list(s.accuracies),
                "mean": s.mean,
                "sd": s.spread,
                "differences": list(s.differences),
                "better": s.better,
                "worse": s.worse,
                "same_as_reference": s.same_as_reference,
            }
            for s in seed_summaries
        ],
        "multitask": {
            "reference": multitask_reference,
            "rows": [_row_json(r) for r in multitask_rows],
            "per_task": multitask.per_task,
            "task_arithmetic_lambda": multitask.task_arithmetic.chosen["lambda"],
        },
        "federated": fed_results,
        **ens.results,
        "timings": dict(timings),
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return DemoReport(
        md,
        folder / "report.html",
        tuple(images),
        tuple(soup_lines + shift_lines + helps + seed_lines + mt_lines + ens.headlines + fed_lines),
    )


def _reader_note(note: str) -> str:
    """A warning raised during one stage of the run (``"stage: Category: message"``), as a
    sentence naming the stage (the scenario) it came from.

    Examples
    --------
    >>> _reader_note("soup scenario: fusions: UserWarning: regmean: tensor 0.weight: singular")
    'During the soup scenario: fusions, a UserWarning was raised: regmean: tensor 0.weight: singular.'
    """
    for category_end in range(len(note)):
        head, sep, message = note[category_end:].partition(": ")
        if sep and head.endswith(("Warning", "Error")) and " " not in head:
            stage = note[:category_end].removesuffix(": ")
            where = f"During the {stage}, " if stage else ""
            text = message.rstrip(".")
            return f"{where}{'a' if where else 'A'} {head} was raised: {text}."
    return note


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
