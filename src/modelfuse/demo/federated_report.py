"""The federated scenario's part of the report: figures, tables, sentences and results.json.

As in the rest of the report, every number and every sentence is computed
from the run's results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfuse.demo.evaluate import MetricRow, verdict
from modelfuse.demo.federated import AGGREGATORS, LOCAL, REFERENCE, FederatedStudy, ScenarioResult

__all__ = ["FederatedReport", "federated_headlines", "federated_report"]


def _f(value: float) -> str:
    return f"{value:.4f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _row(scenario: ScenarioResult, name: str) -> MetricRow:
    return next(r for r in scenario.rows if r.name == name)


def _best(scenario: ScenarioResult) -> MetricRow:
    """The aggregator with the highest final held-out accuracy (first listed on ties)."""
    rows = [r for r in scenario.rows if r.name != LOCAL]
    return max(rows, key=lambda r: (r.metrics["accuracy"][0], -rows.index(r)))


def _gain_sentence(scenario: ScenarioResult) -> str:
    result = scenario.personalization
    n = len(result.clients)
    gains, losses = len(result.gains), len(result.losses)
    return (
        f"concentration {scenario.concentration:g}: {gains} of {n} clients gain from the "
        f"global model ({scenario.chosen}), {losses} lose, {n - gains - losses} show no "
        "significant difference"
    )


def federated_headlines(study: FederatedStudy) -> list[str]:
    """Sentences stating the scenario's results as the numbers say them.

    One per partition on the final global accuracy, and one on how many
    clients gain or lose from the global model.
    """
    fed = study.settings
    out = []
    for s in study.scenarios:
        best = _best(s)
        ref = _row(s, REFERENCE)
        local = _row(s, LOCAL)
        acc, ci = best.metrics["accuracy"]
        if best.name == REFERENCE:
            versus = "FedAvg itself"
        else:
            diff = best.differences["accuracy"]
            said = verdict(best)
            versus = (
                f"FedAvg {_f(ref.metrics['accuracy'][0])}; difference {diff[0]:+.4f}, "
                f"Holm-adjusted p {diff[2]:.4f}: {said}"
            )
        out.append(
            f"Federated scenario, Dirichlet concentration {s.concentration:g} "
            f"({fed.n_clients} clients, {fed.rounds} rounds on Flower): the highest final global "
            f"accuracy is {best.name}'s {_f(acc)} {_ci(ci)} ({versus}); the clients' local "
            f"models reach {_f(local.metrics['accuracy'][0])} on their own held-out data."
        )
    out.append(
        "Clients gaining from the global model (accuracy, global against local, "
        "Holm-adjusted p <= 0.05): " + "; ".join(_gain_sentence(s) for s in study.scenarios) + "."
    )
    return out


@dataclass(frozen=True)
class FederatedReport:
    """The sections, headlines and results.json entry of the federated scenario."""

    sections: list[Any]
    headlines: list[str]
    results: dict[str, Any]


def _setup_table(study: FederatedStudy) -> tuple[list[str], list[list[str]]]:
    headers = ["client", "participation probability"]
    for s in study.scenarios:
        headers += [
            f"concentration {s.concentration:g}: train / val / held-out",
            f"concentration {s.concentration:g}: its largest class",
        ]
    body = []
    for k, p in enumerate(study.participation):
        cells = [f"client {k}", f"{p:.2f}"]
        for s in study.scenarios:
            counts = s.class_counts[k]
            top = max(range(len(counts)), key=lambda c: counts[c])
            cells += [
                " / ".join(str(n) for n in s.sizes[k]),
                f"digit {top}, {counts[top] / sum(counts):.0%} of its examples",
            ]
        body.append(cells)
    return headers, body


def _accuracy_table(study: FederatedStudy) -> tuple[list[str], list[list[str]]]:
    headers = [
        "concentration",
        "model",
        "held-out accuracy",
        "95% CI of accuracy",
        "difference to FedAvg",
        "95% CI of the difference (Holm-consistent)",
        "p (Holm)",
        "verdict",
        "NLL",
        "ECE",
    ]
    body = []
    for s in study.scenarios:
        for r in s.rows:
            acc, ci = r.metrics["accuracy"]
            diff = r.differences.get("accuracy")
            body.append(
                [
                    f"{s.concentration:g}",
                    r.name,
                    _f(acc),
                    _ci(ci),
                    "" if diff is None else f"{diff[0]:+.4f}",
                    "" if diff is None else _ci(diff[1]),
                    "" if diff is None else f"{diff[2]:.4f}",
                    verdict(r),
                    _f(r.metrics["nll"][0]),
                    _f(r.metrics["ece"][0]),
                ]
            )
    return headers, body


def _client_table(scenario: ScenarioResult) -> tuple[list[str], list[list[str]]]:
    from modelfuse.federated import CANDIDATES

    names = {"selected": "FedLabel"}
    headers = [
        "client",
        "alpha (local share)",
        *(names.get(c, c) for c in CANDIDATES),
        "global - local",
        "95% CI of global - local",
        "p (Holm)",
    ]
    body = []
    for c in scenario.personalization.clients:
        diff = c.differences["global"]["accuracy"]
        body.append(
            [
                c.name,
                f"{c.alpha:.2f}",
                *(_f(c.scores[k]["accuracy"]) for k in CANDIDATES),
                f"{diff.statistic:+.4f}",
                _ci(diff.ci),
                f"{c.adjusted_pvalues['global']['accuracy']:.4f}",
            ]
        )
    return headers, body


def _row_json(row: MetricRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "metrics": {m: {"value": v, "ci": list(ci)} for m, (v, ci) in row.metrics.items()},
        "vs_fedavg": {
            m: {"difference": d, "ci": list(ci), "p_holm": p}
            for m, (d, ci, p) in row.differences.items()
        },
        "verdict": verdict(row),
    }


def _scenario_json(s: ScenarioResult) -> dict[str, Any]:
    result = s.personalization
    return {
        "concentration": s.concentration,
        "client_sizes": [list(n) for n in s.sizes],
        "class_counts": s.class_counts,
        "accuracy_per_round": {
            name: [{"round": r, "val": v, "test": t} for r, v, t in curve]
            for name, curve in s.curves.items()
        },
        "rows": [_row_json(r) for r in s.rows],
        "skipped_replies": list(s.skipped),
        "per_client": {
            "global_model": s.chosen,
            "gains": list(result.gains),
            "losses": list(result.losses),
            "clients": [
                {
                    "name": c.name,
                    "alpha": c.alpha,
                    "scores": c.scores,
                    "global_minus_local": {
                        m: {
                            "difference": float(d.statistic),
                            "ci": [float(d.ci[0]), float(d.ci[1])],
                            "p_holm": c.adjusted_pvalues["global"][m],
                        }
                        for m, d in c.differences["global"].items()
                    },
                }
                for c in result.clients
            ],
        },
    }


def federated_report(
    study: FederatedStudy,
    *,
    n_resamples: int,
    interval: str,
    image: Callable[[str], Path],
) -> FederatedReport:
    """Draw the scenario's figures (through ``image(name)``, which returns the path to write)
    and build its sections, headlines and results."""
    from modelfuse.demo.plots import federated_rounds_plot
    from modelfuse.report import Section

    fed = study.settings
    federated_rounds_plot(
        [
            (
                f"Dirichlet concentration {s.concentration:g}",
                s.curves,
                _row(s, LOCAL).metrics["accuracy"][0],
            )
            for s in study.scenarios
        ],
        image("federated_rounds.png"),
    )
    for s in study.scenarios:
        s.personalization.plot(image(f"federated_clients_{s.concentration:g}.png"))
    lines = federated_headlines(study)
    methods = ", ".join(
        f"{name} ({', '.join(f'{k} {v}' for k, v in AGGREGATORS[name].items())})"
        for name in fed.aggregators
    )
    joined = [len(r) for r in study.rounds]
    flower = study.flower
    skipped = [m for s in study.scenarios for m in s.skipped]
    interval_name = {"bca": "BCa", "percentile": "percentile"}.get(interval, interval)
    sections = [
        Section(
            "Federated scenario: setup",
            (
                f"All 1,797 digits are shared among {fed.n_clients} clients by a Dirichlet "
                f"partition of every class (concentration "
                + " and ".join(f"{c:g}" for c in fed.concentrations)
                + "; the smaller, the fewer classes each client sees; every client keeps at "
                f"least {fed.min_client_size} examples). Each client splits its share at random "
                "into 60% training, 20% validation and 20% held-out data; the global models "
                "are scored on the clients' pooled held-out data, each client on its own.",
                f"Training: a {fed.hidden}-unit two-hidden-layer MLP from one random "
                f"initialisation, {fed.rounds} rounds (the full run has 30, --quick fewer); in "
                f"each round every client takes part with its own probability (the table; "
                f"{min(joined)} to {max(joined)} clients per round, the same clients in the "
                f"same round for every aggregator and partition) and runs {fed.local_epochs} "
                f"epochs of SGD (learning rate {fed.learning_rate:g}, batches of "
                f"{fed.batch_size}) with the same seeds for every aggregator. Aggregators "
                f"(modelfuse.federated.MergeStrategy settings): {methods}. Fisher's clients "
                "send their diagonal Fisher on up to "
                f"{fed.fisher_examples} training examples.",
                f"Engine: Flower {flower['flower']}, {flower['engine']} with "
                f"{flower['virtual_supernodes']} virtual SuperNodes on its {flower['backend']} "
                f"backend; one ServerApp runs the {flower['strategy_runs']} strategy runs at "
                "the same time on one grid (each its own rounds; replies are aggregated in "
                "client order) and scores the global model after every round. The local "
                "models are trained in this process on each client's training part alone, "
                f"for {fed.rounds * fed.local_epochs} epochs (rounds x local epochs).",
                (
                    "Client replies left out by the strategy: " + "; ".join(skipped[:10]) + "."
                    if skipped
                    else "No client reply was left out by the strategy."
                ),
            ),
            table=_setup_table(study),
        ),
        Section(
            "Federated scenario: global accuracy",
            (
                *lines[:-1],
                "Final global models and the local models on the pooled held-out data, with "
                f"95% {interval_name} bootstrap intervals ({n_resamples} resamples); "
                "differences to FedAvg with paired bootstrap tests, Holm-adjusted within each "
                "partition, and the Holm-consistent interval of each difference (it excludes 0 "
                "exactly when the verdict is significant). 'local models' predicts each "
                "client's held-out data with that client's own model.",
            ),
            table=_accuracy_table(study),
            align=("left", "left", *("right",) * 5, "left", "right", "right"),
            images=(
                (
                    "federated_rounds.png",
                    "Global model's pooled held-out accuracy per round and aggregator",
                ),
            ),
        ),
    ]
    for s in study.scenarios:
        result = s.personalization
        sections.append(
            Section(
                f"Federated scenario: local, global or between (concentration {s.concentration:g})",
                (
                    f"Per client, on its own held-out data: its local model, the global model "
                    f"({s.chosen}, the aggregator with the best pooled validation accuracy), "
                    "the interpolation (1 - alpha) global + alpha local with alpha chosen on the "
                    "client's validation data (WiSE-FT), and FedLabel's per-sample choice of "
                    "the more confident of local and global (modelfuse.federated.Personalizer). "
                    f"Paired percentile bootstrap intervals ({n_resamples} resamples) of global "
                    "minus local; p-values Holm-adjusted over every client and candidate.",
                    _gain_sentence(s)[0].upper()
                    + _gain_sentence(s)[1:]
                    + ": "
                    + (
                        f"gain {', '.join(result.gains)}"
                        if result.gains
                        else "no client gains significantly"
                    )
                    + "; "
                    + (
                        f"lose {', '.join(result.losses)}"
                        if result.losses
                        else "no client loses significantly"
                    )
                    + ".",
                ),
                table=_client_table(s),
                images=(
                    (
                        f"federated_clients_{s.concentration:g}.png",
                        f"Global minus local accuracy per client (concentration "
                        f"{s.concentration:g})",
                    ),
                ),
            )
        )
    results = {
        "settings": {
            "clients": fed.n_clients,
            "concentrations": list(fed.concentrations),
            "rounds": fed.rounds,
            "aggregators": {name: AGGREGATORS[name] for name in fed.aggregators},
            "local_epochs": fed.local_epochs,
            "learning_rate": fed.learning_rate,
            "batch_size": fed.batch_size,
        },
        "engine": dict(flower),
        "participation": study.participation,
        "clients_per_round": study.rounds,
        "scenarios": [_scenario_json(s) for s in study.scenarios],
    }
    return FederatedReport(sections, lines, results)
