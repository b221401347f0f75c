"""The ensembles' part of the demo report: the distilled rows, diversity beside the gain, and
the risk-coverage of the soup scenario's main candidates.

Every number and sentence is computed from the run's predictions and rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelfuse.demo.distilled import DistilledSummary
from modelfuse.demo.diversity import DiversityRow, diversity_row
from modelfuse.demo.evaluate import Entry, MetricRow, probabilities
from modelfuse.demo.selective import SelectiveRow, selective_row

__all__ = [
    "EnsembleReport",
    "distilled_sentences",
    "distilled_values",
    "diversity_sentence",
    "ensemble_report",
]

METRICS = ("accuracy", "nll", "ece")
_WORDS = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE"}
_GREATER = {"accuracy": True, "nll": False, "ece": False}


@dataclass(frozen=True)
class EnsembleReport:
    """What :func:`ensemble_report` produced.

    Attributes
    ----------
    headlines : list of str
        The distilled rows' sentences, for the report's summary.
    sections : list of Section
    results : dict
        Every number, for ``results.json``.
    """

    headlines: list[str]
    sections: list[Any]
    results: dict[str, Any] = field(default_factory=dict)


def _row_named(rows: Sequence[MetricRow], name: str) -> MetricRow:
    """The row holding candidate ``name`` (identical models share a row, names joined by ' = ')."""
    return next(r for r in rows if name in r.name.split(" = "))


def distilled_values(
    rows: Sequence[MetricRow],
    entries: Sequence[Entry],
    labels: np.ndarray,
    summary: DistilledSummary,
    split: Literal["test", "shift"] = "test",
) -> dict[str, dict[str, float]]:
    """Accuracy, NLL and ECE of the ensemble, the best merge and the distilled row on one split.

    Values come from the comparison ``rows`` when they hold the metric, else
    (the multi-task scenario's NLL and ECE) from the entries' predictions by
    :func:`modelfuse.evaluation.metrics.get_metric`, the same functions.
    Keys: ``"ensemble"``, ``"merge"``, ``"distilled"``.
    """
    from modelfuse.evaluation.metrics import get_metric

    by_name = {e.name: e for e in entries}
    out: dict[str, dict[str, float]] = {}
    for role, name in (
        ("ensemble", summary.teacher),
        ("merge", summary.start),
        ("distilled", summary.name),
    ):
        row = _row_named(rows, name)
        values = {}
        for metric in METRICS:
            if metric in row.metrics:
                values[metric] = float(row.metrics[metric][0])
            else:
                p = probabilities(by_name[name].split(split))
                values[metric] = float(get_metric(metric).function(p, labels))
        out[role] = values
    return out


def _compare(metric: str, value: float, other: float, other_name: str) -> str:
    diff = value - other
    if diff == 0:
        said = "the same as"
    elif (diff > 0) == _GREATER[metric]:
        said = "better than"
    else:
        said = "worse than"
    return f"{said} {other_name} ({other:.4f}, difference {diff:+.4f})"


def distilled_sentences(
    where: str, values: Mapping[str, Mapping[str, float]], summary: DistilledSummary
) -> list[str]:
    """How the distilled row compares with its ensemble and with the best merge, per metric,
    and what share of the ensemble's accuracy gain over the best merge it keeps.

    Examples
    --------
    >>> s = DistilledSummary("distilled", "vote", 4, "soup", 9, 7, 10, 0.97, None)
    >>> v = {"ensemble": {"accuracy": 0.95, "nll": 0.2, "ece": 0.03},
    ...      "merge": {"accuracy": 0.91, "nll": 0.3, "ece": 0.05},
    ...      "distilled": {"accuracy": 0.94, "nll": 0.25, "ece": 0.02}}
    >>> print(distilled_sentences("Soup, test", v, s)[1])
    Soup, test: the distilled ensemble keeps 75% of the ensemble's accuracy gain over soup (+0.0300 of +0.0400) at 1 network per prediction instead of 4.
    """
    d, e, m = values["distilled"], values["ensemble"], values["merge"]
    parts = []
    for metric in METRICS:
        parts.append(
            f"{_WORDS[metric]} {d[metric]:.4f}, "
            + _compare(metric, d[metric], e[metric], "the ensemble")
            + " and "
            + _compare(metric, d[metric], m[metric], summary.start)
        )
    first = (
        f"{where}: the distilled ensemble (1 network per prediction) against the "
        f"{summary.teacher} it was distilled from ({summary.teacher_cost} networks) and "
        f"{summary.start}, the best merge (its starting point): " + "; ".join(parts) + "."
    )
    gain = e["accuracy"] - m["accuracy"]
    kept = d["accuracy"] - m["accuracy"]
    if gain > 0 and kept > gain:
        second = (
            f"{where}: the distilled ensemble is more accurate than the ensemble itself: "
            f"{kept:+.4f} over {summary.start} where the ensemble gains {gain:+.4f}, at 1 network "
            f"per prediction instead of {summary.teacher_cost}."
        )
    elif gain > 0:
        second = (
            f"{where}: the distilled ensemble keeps {kept / gain:.0%} of the ensemble's accuracy "
            f"gain over {summary.start} ({kept:+.4f} of {gain:+.4f}) at 1 network per prediction "
            f"instead of {summary.teacher_cost}."
        )
    else:
        second = (
            f"{where}: the ensemble is not more accurate than {summary.start} ({gain:+.4f}), so "
            f"there is no accuracy gain to keep; the distilled ensemble's accuracy differs from "
            f"{summary.start}'s by {kept:+.4f}."
        )
    return [first, second]


def diversity_sentence(row: DiversityRow) -> str:
    """One diversity row said as a sentence.

    Examples
    --------
    >>> r = DiversityRow("soft vote", "test split", ("a", "b"), 0.1, 0.05,
    ...     {"ensemble": 0.2, "mean_member": 0.3, "ambiguity": 0.1, "best_member": 0.25,
    ...      "gain": 0.05}, {"ensemble": 0.1, "mean_member": 0.12, "ambiguity": 0.02,
    ...      "best_member": 0.11, "gain": 0.01}, {"nll": "a", "brier": "a"})
    >>> print(diversity_sentence(r))
    soft vote, test split: its 2 members disagree on 10.0% of the images per pair on average (mutual information 0.0500 nats); their diversity lowers the NLL by 0.1000 below the members' mean (0.3000 -> 0.2000), and the ensemble's NLL is 0.0500 below its best member's (a, 0.2500).
    """
    gain = row.nll["gain"]
    relation = "below" if gain >= 0 else "above"
    if len(row.members) == 1:
        return (
            f"{row.ensemble}, {row.split}: one member ({row.members[0]}), so no diversity: "
            f"the ensemble is that member (NLL {row.nll['ensemble']:.4f})."
        )
    return (
        f"{row.ensemble}, {row.split}: its {len(row.members)} members disagree on "
        f"{row.disagreement:.1%} of the images per pair on average (mutual information "
        f"{row.mutual_information:.4f} nats); their diversity lowers the NLL by "
        f"{row.nll['ambiguity']:.4f} below the members' mean ({row.nll['mean_member']:.4f} -> "
        f"{row.nll['ensemble']:.4f}), and the ensemble's NLL is {abs(gain):.4f} {relation} its "
        f"best member's ({row.best_member['nll']}, {row.nll['best_member']:.4f})."
    )


def _f(x: float) -> str:
    return f"{x:.4f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def ensemble_report(
    *,
    soup_entries: Sequence[Entry],
    soup_rows: Sequence[MetricRow],
    soup_shift_rows: Sequence[MetricRow],
    soup_distilled: DistilledSummary,
    soup_reference: str,
    caruana_weights: Mapping[str, float],
    n_soup: int,
    y_test: np.ndarray,
    multitask_entries: Sequence[Entry],
    multitask_rows: Sequence[MetricRow],
    multitask_distilled: DistilledSummary,
    multitask_y_test: np.ndarray,
    n_tasks: int,
    shift_label: str,
    n_resamples: int,
    interval: Literal["bca", "percentile"],
    seed: int,
    image: Callable[[str], Path],
) -> EnsembleReport:
    """The distilled-ensemble, diversity and risk-coverage sections of the demo report.

    ``soup_entries`` are the soup scenario's candidates (the first ``n_soup``
    its fine-tunes, ``soup_reference`` one of them); ``multitask_entries``
    the multi-task scenario's (the first ``n_tasks`` its task models).
    ``image(name)`` gives the path of a figure to draw.
    """
    from modelfuse.evaluation.selective import risk_coverage_plot
    from modelfuse.report import Section

    # distilled rows
    splits = (
        ("Soup scenario, test split", soup_rows, soup_entries, y_test, soup_distilled, "test"),
        (
            f"Soup scenario, shifted test split ({shift_label})",
            soup_shift_rows,
            soup_entries,
            y_test,
            soup_distilled,
            "shift",
        ),
        (
            "Multi-task scenario, pooled test split",
            multitask_rows,
            multitask_entries,
            multitask_y_test,
            multitask_distilled,
            "test",
        ),
    )
    lines: list[str] = []
    body = []
    distilled_json = []
    for where, rows, entries, labels, summary, split in splits:
        values = distilled_values(rows, entries, labels, summary, split)  # type: ignore[arg-type]
        lines += distilled_sentences(where, values, summary)
        for role, name, cost in (
            ("ensemble (teacher)", summary.teacher, summary.teacher_cost),
            ("best merge (start)", summary.start, 1),
            ("distilled", summary.name, 1),
        ):
            key = role.split(" ")[0]
            v = values["merge" if key == "best" else key]
            body.append([where, name, role, str(cost), *(_f(v[m]) for m in METRICS)])
        distilled_json.append(
            {
                "where": where,
                "teacher": summary.teacher,
                "teacher_networks": summary.teacher_cost,
                "start": summary.start,
                "best_epoch": summary.best_epoch,
                "epochs": summary.epochs,
                "max_epochs": summary.max_epochs,
                "val_agreement": summary.val_agreement,
                "values": values,
            }
        )
    distilled_section = Section(
        "Distilled ensembles: K networks back to one",
        (
            "In each scenario the soft vote (every member, K networks per prediction) is "
            "distilled into one network of the members' architecture: it starts from the best "
            "merge's weights (the one-network merge with the lowest validation NLL, copies of a "
            "single fine-tune left out), learns the soft vote's probabilities on the training "
            "images (KL at temperature "
            "4, weight 0.9) with the training labels (cross-entropy, weight 0.1), and early "
            "stopping on the validation images keeps its best epoch. It is scored like every "
            "other row (the comparison tables, intervals and Holm families above); here it is "
            "set beside the ensemble it came from and the merge it started from; these "
            "differences are between point estimates on one split, not tested (each row's "
            "test is against the reference, in the tables above). The "
            "multi-task comparison table holds accuracy only; its NLL and ECE here are point "
            "values from the same metric functions.",
            f"Soup scenario: epoch {soup_distilled.best_epoch} of {soup_distilled.epochs} run "
            f"(at most {soup_distilled.max_epochs}) kept; the student's top class is the soft "
            f"vote's on {soup_distilled.val_agreement:.1%} of the validation images. Multi-task "
            f"scenario: epoch {multitask_distilled.best_epoch} of {multitask_distilled.epochs} "
            f"(at most {multitask_distilled.max_epochs}); {multitask_distilled.val_agreement:.1%} "
            "agreement.",
            *lines,
        ),
        table=(
            ["where", "model", "role", "networks run", "accuracy", "NLL", "ECE"],
            body,
        ),
        align=("left", "left", "left", "right", "right", "right", "right"),
    )

    # diversity beside the gain
    fine_tunes = list(soup_entries[:n_soup])
    names = [e.name for e in fine_tunes]
    caruana = [float(caruana_weights.get(n, 0.0)) for n in names]
    tasks = list(multitask_entries[:n_tasks])
    rows_div: list[DiversityRow] = []
    for split, label in (("test", "test split"), ("shift", "shifted test split")):
        for ensemble, weights in (
            ("soup scenario: soft vote", None),
            (
                "soup scenario: Caruana ensemble",
                caruana,
            ),
        ):
            rows_div.append(
                diversity_row(
                    ensemble,
                    label,
                    names,
                    [e.split(split) for e in fine_tunes],  # type: ignore[arg-type]
                    y_test,
                    weights,
                )
            )
    rows_div.append(
        diversity_row(
            "multi-task scenario: soft vote",
            "pooled test split",
            [e.name for e in tasks],
            [e.test for e in tasks],
            multitask_y_test,
        )
    )
    diversity_section = Section(
        "Ensembles: diversity beside the gain",
        (
            "For each ensemble and split: the mean over pairs of members of the share of "
            "images whose top classes differ (disagreement), the mean mutual information "
            "between the prediction and the member (epistemic uncertainty, nats, under the "
            "ensemble's weights), and the ambiguity decomposition of the ensemble's loss: "
            "ensemble loss = the members' weighted mean loss - ambiguity, exactly, for the NLL "
            "and the Brier score. The ambiguity is what the diversity buys over the average "
            "member; the gain is the ensemble's loss below that of its best member on the same "
            "split (the member picked on the split it is scored on; negative: the best member "
            "is better). Caruana's members are those it selected, weighted as it weighted "
            "them.",
            *(diversity_sentence(r) for r in rows_div),
        ),
        table=(
            [
                "ensemble",
                "split",
                "members",
                "disagreement",
                "mutual information",
                "NLL",
                "NLL ambiguity",
                "NLL gain over best member",
                "Brier ambiguity",
                "Brier gain over best member",
            ],
            [
                [
                    r.ensemble,
                    r.split,
                    str(len(r.members)),
                    _f(r.disagreement),
                    _f(r.mutual_information),
                    _f(r.nll["ensemble"]),
                    _f(r.nll["ambiguity"]),
                    f"{r.nll['gain']:+.4f}",
                    _f(r.brier["ambiguity"]),
                    f"{r.brier['gain']:+.4f}",
                ]
                for r in rows_div
            ],
        ),
        align=("left", "left", *("right",) * 8),
    )

    # risk-coverage on the test split
    by_name = {e.name: e for e in soup_entries}
    chosen = [
        (f"{soup_reference} (reference)", soup_reference),
        (f"{soup_distilled.start} (best merge)", soup_distilled.start),
        (soup_distilled.teacher, soup_distilled.teacher),
        (soup_distilled.name, soup_distilled.name),
    ]
    selective: list[tuple[str, int, SelectiveRow]] = []
    for i, (label, name) in enumerate(chosen):
        entry = by_name[name]
        selective.append(
            (
                label,
                entry.cost,
                selective_row(
                    label,
                    entry.test,
                    y_test,
                    n_resamples=n_resamples,
                    seed=seed + 20 + 2 * i,
                    interval=interval,
                ),
            )
        )
    risk_coverage_plot(
        {label: row.curve for label, _, row in selective},
        image("soup_risk_coverage.png"),
        title="Soup scenario, test split (confidence: top probability)",
    )
    best_aurc = min(selective, key=lambda t: t[2].aurc[0])
    best_e = min(selective, key=lambda t: t[2].e_aurc[0])
    fallbacks = sum(u != interval for _, _, row in selective for u in row.intervals.values())
    method = {"bca": "BCa", "percentile": "percentile"}[interval]
    selective_section = Section(
        "Selective prediction: risk-coverage on the test split",
        (
            "Each model answers the test images it is most confident about (confidence: its "
            "largest class probability) and abstains on the rest. The curve gives the error "
            "rate among the answered images at each coverage; AURC is its area (lower is "
            "better), E-AURC the area above the oracle ordering's with the same errors (the "
            "ranking alone, not the accuracy). Intervals: 95% "
            f"{method} bootstrap of the test images ({n_resamples} resamples)"
            + (
                f"; percentile where BCa is unstable ({fallbacks} of the {2 * len(selective)} "
                "intervals)"
                if fallbacks
                else ""
            )
            + ".",
            f"Lowest AURC: {best_aurc[0]} ({best_aurc[2].aurc[0]:.4f}); lowest E-AURC: "
            f"{best_e[0]} ({best_e[2].e_aurc[0]:.4f}). Picked on the test split they are "
            "scored on; compare the intervals.",
        ),
        table=(
            ["model", "networks run", "AURC", "95% CI of AURC", "E-AURC", "95% CI of E-AURC"],
            [
                [label, str(cost), _f(r.aurc[0]), _ci(r.aurc[1]), _f(r.e_aurc[0]), _ci(r.e_aurc[1])]
                for label, cost, r in selective
            ],
        ),
        align=("left", *("right",) * 5),
        images=(("soup_risk_coverage.png", "Risk-coverage on the test split"),),
    )
    results = {
        "distilled": distilled_json,
        "diversity": [
            {
                "ensemble": r.ensemble,
                "split": r.split,
                "members": list(r.members),
                "disagreement": r.disagreement,
                "mutual_information": r.mutual_information,
                "nll": r.nll,
                "brier": r.brier,
                "best_member": r.best_member,
            }
            for r in rows_div
        ],
        "risk_coverage": [
            {
                "model": label,
                "networks_run": cost,
                "aurc": {"value": r.aurc[0], "ci": list(r.aurc[1])},
                "e_aurc": {"value": r.e_aurc[0], "ci": list(r.e_aurc[1])},
                "interval": r.intervals,
            }
            for label, cost, r in selective
        ],
    }
    return EnsembleReport(lines, [distilled_section, diversity_section, selective_section], results)
