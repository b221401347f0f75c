"""The federated scenario: digits over 10 non-IID clients, five aggregators on Flower.

All 1,797 digits are shared among the clients by a Dirichlet partition
(:func:`modelfuse.demo.partition.dirichlet_partition`) at each concentration
of the settings (0.3: each client sees a few classes; 10: close to IID); each
client keeps its own training, validation and held-out parts. For each
partition and each aggregator (FedAvg, FedAvgM, FedAU, TIES, Fisher) the same
federated training runs in Flower's simulation engine
(:mod:`modelfuse.demo.flower_run`): the same initial model, the same clients
taking part in each round (each client joins a round with its own
probability), the same local SGD seeds. The server scores the global model
on the clients' pooled validation and held-out parts after every round.

Afterwards, in this process: each client's *local* model (trained on its own
data alone, with as many epochs as its federated training had rounds times
local epochs); the final global models and the local models compared on the
pooled held-out parts (bootstrap intervals, paired bootstrap tests against FedAvg,
Holm-adjusted); and, per client, local / global / interpolated / FedLabel
(:class:`modelfuse.federated.Personalizer`) with the global model of the
aggregator with the best pooled validation accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfuse.demo.evaluate import Entry, MetricRow, accuracy_of, log_probabilities
from modelfuse.demo.partition import ClientIndices, client_parts, dirichlet_partition
from modelfuse.demo.settings import DemoSettings, FederatedSettings
from modelfuse.errors import ConfigError
from modelfuse.federated.personalize import PersonalizationResult

__all__ = [
    "AGGREGATORS",
    "FederatedStudy",
    "ScenarioData",
    "ScenarioResult",
    "client_seed",
    "federated_study",
    "local_sgd",
    "participants",
    "participation_probabilities",
    "scenario_data",
]

StateDict = dict[str, torch.Tensor]

AGGREGATORS: dict[str, dict[str, Any]] = {
    "FedAvg": {"method": "linear"},
    "FedAvgM": {"method": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.5},
    "FedAU": {"method": "fedau", "server_learning_rate": 1.0},
    "TIES": {"method": "ties", "density": 0.5},
    "Fisher": {"method": "fisher"},
}
"""The demo's aggregators: display name to :class:`modelfuse.federated.MergeStrategy` settings."""

REFERENCE = "FedAvg"
"""The aggregator every other one (and the local models) is tested against."""

LOCAL = "local models"
"""The name of the pooled local-model predictions in the comparison."""


def _check_aggregators(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in AGGREGATORS]
    if unknown or REFERENCE not in names:
        raise ConfigError(
            f"aggregators: expected names among {', '.join(AGGREGATORS)} including {REFERENCE}, "
            f"got {repr(names)[:80]}"
        )


@dataclass(frozen=True)
class ScenarioData:
    """The digits and one Dirichlet partition of them into clients' parts."""

    x: np.ndarray
    y: np.ndarray
    clients: tuple[ClientIndices, ...]

    def pooled(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Every client's ``part`` ("train", "val" or "test") in client order."""
        index = np.concatenate([getattr(c, part) for c in self.clients])
        return self.x[index], self.y[index]


@functools.lru_cache(maxsize=4)
def scenario_data(seed: int, concentration: float, n_clients: int, min_size: int) -> ScenarioData:
    """The partition of the digits at ``concentration``, fixed by ``seed`` (cached).

    Flower's client processes call it too: every client rebuilds the same
    partition from these four numbers and takes its own part, as a client
    loads its own data in a real federation.

    Examples
    --------
    >>> data = scenario_data(0, 0.3, 10, 40)
    >>> len(data.clients), sum(len(c.train) + len(c.val) + len(c.test) for c in data.clients)
    (10, 1797)
    """
    from modelfuse.demo.data import load_digits_scaled

    x, y = load_digits_scaled()
    parts = dirichlet_partition(y, n_clients, concentration, seed=seed, min_size=min_size)
    clients = tuple(
        client_parts(index, seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        for k, index in enumerate(parts)
    )
    x.setflags(write=False)
    y.setflags(write=False)
    return ScenarioData(x, y, clients)


def client_seed(seed: int, scenario: int, server_round: int, client: int) -> int:
    """The seed of one client's local SGD in one round (the same for every aggregator).

    Examples
    --------
    >>> client_seed(0, 1, 3, 4) == client_seed(0, 1, 3, 4) != client_seed(0, 1, 3, 5)
    True
    """
    return int(np.random.SeedSequence([seed, scenario, server_round, client]).generate_state(1)[0])


def participation_probabilities(seed: int, settings: FederatedSettings) -> np.ndarray:
    """Each client's probability of taking part in a round, uniform in ``settings.participation``.

    Examples
    --------
    >>> from modelfuse.demo.settings import QUICK
    >>> p = participation_probabilities(0, QUICK.federated)
    >>> len(p), bool(((p >= 0.3) & (p <= 1.0)).all())
    (10, True)
    """
    low, high = settings.participation
    rng = np.random.default_rng([seed, 98])
    return rng.uniform(low, high, settings.n_clients)


def participants(seed: int, server_round: int, probabilities: np.ndarray) -> list[int]:
    """The clients taking part in ``server_round``: client k when a uniform draw is below p_k.

    When no draw is, the client whose draw is closest to its probability (relative to it)
    takes part alone, so that every round trains. The same seed and round give the same
    clients, whatever the aggregator or partition.

    Examples
    --------
    >>> participants(0, 1, np.ones(4))
    [0, 1, 2, 3]
    """
    u = np.random.default_rng([seed, 99, server_round]).random(len(probabilities))
    chosen = np.flatnonzero(u < probabilities)
    if len(chosen) == 0:
        chosen = np.array([int(np.argmin(u / probabilities))])
    return [int(k) for k in chosen]


def local_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """Plain SGD on cross-entropy, in place, batches shuffled by ``seed``; the model ends in
    evaluation mode.

    Examples
    --------
    >>> from modelfuse.demo.zoo import make_mlp
    >>> net = make_mlp(8)
    >>> before = net.state_dict()["0.bias"].clone()
    >>> x = np.zeros((4, 64), dtype=np.float32); y = np.array([0, 1, 2, 3])
    >>> _ = local_sgd(net, x, y, epochs=1, learning_rate=0.1, batch_size=2, seed=0)
    >>> bool((net.state_dict()["0.bias"] != before).any())
    True
    """
    generator = torch.Generator().manual_seed(seed)
    xs = torch.as_tensor(x)
    ys = torch.as_tensor(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ys), generator=generator)
        for start in range(0, len(ys), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(xs[index]), ys[index]).backward()
            optimizer.step()
    model.eval()
    return model


@dataclass(frozen=True)
class ScenarioResult:
    """One partition's results.

    Attributes
    ----------
    concentration : float
    sizes : list of (int, int, int)
        Per client: training, validation and held-out examples.
    class_counts : list of list of int
        Per client: examples of each class (all three parts).
    curves : dict
        ``curves[aggregator]``: ``(round, pooled validation accuracy, pooled
        held-out accuracy)`` of the global model from round 0 (the initial model).
    rows : list of MetricRow
        The final global models and the local models on the pooled held-out
        parts, against FedAvg.
    chosen : str
        The aggregator whose final global model the per-client comparison uses
        (best pooled validation accuracy; the first listed on ties).
    personalization : PersonalizationResult
    skipped : list of str
        Client replies the strategy left out, with the reason.
    """

    concentration: float
    sizes: list[tuple[int, int, int]]
    class_counts: list[list[int]]
    curves: dict[str, list[tuple[int, float, float]]]
    rows: list[MetricRow]
    chosen: str
    personalization: PersonalizationResult
    skipped: list[str]


@dataclass(frozen=True)
class FederatedStudy:
    """Everything the federated scenario produced.

    Attributes
    ----------
    settings : FederatedSettings
    participation : list of float
        Each client's probability of taking part in a round.
    rounds : list of list of int
        The clients taking part in each round (round 1 first).
    scenarios : list of ScenarioResult
        One per concentration.
    flower : dict
        What ran the rounds: Flower's version, the engine and backend, the
        number of strategy runs.
    """

    settings: FederatedSettings
    participation: list[float]
    rounds: list[list[int]]
    scenarios: list[ScenarioResult]
    flower: dict[str, Any]


def _log_probs(model: nn.Module, state: Mapping[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    from modelfuse.demo.zoo import predict_logits

    return log_probabilities(predict_logits(model, dict(state), x))


def _local_models(
    data: ScenarioData, initial: StateDict, fed: FederatedSettings, seed: int, scenario: int
) -> list[StateDict]:
    from modelfuse.demo.zoo import make_mlp

    states = []
    for k, part in enumerate(data.clients):
        net = make_mlp(fed.hidden)
        net.load_state_dict(initial)
        local_sgd(
            net,
            data.x[part.train],
            data.y[part.train],
            epochs=fed.rounds * fed.local_epochs,
            learning_rate=fed.learning_rate,
            batch_size=fed.batch_size,
            seed=client_seed(seed, scenario, 0, k),
        )
        states.append({name: t.detach().clone() for name, t in net.state_dict().items()})
    return states


def federated_study(
    settings: DemoSettings,
    seed: int,
    *,
    tick: Callable[[str], None] | None = None,
) -> FederatedStudy:
    """Run the federated scenario; see the module docstring.

    ``tick`` is called after every federated round (from Flower's server
    thread) and after each partition's evaluation.
    """
    from modelfuse.demo.evaluate import compare_entries
    from modelfuse.demo.flower_run import run_rounds
    from modelfuse.demo.zoo import make_mlp
    from modelfuse.federated import ClientSplit, Personalizer

    fed = settings.federated
    _check_aggregators(fed.aggregators)
    step = tick or (lambda name: None)
    torch.manual_seed(seed)
    initial = {k: v.detach().clone() for k, v in make_mlp(fed.hidden).state_dict().items()}
    probabilities = participation_probabilities(seed, fed)
    flower = run_rounds(fed, seed, initial, probabilities, on_round=step)

    model = make_mlp(fed.hidden)
    scenarios = []
    for s, concentration in enumerate(fed.concentrations):
        data = scenario_data(seed, concentration, fed.n_clients, fed.min_client_size)
        x_val, _ = data.pooled("val")
        x_test, y_test = data.pooled("test")
        y_val = data.pooled("val")[1]
        entries = []
        for name in fed.aggregators:
            run = flower.runs[(s, name)]
            entries.append(
                Entry(
                    name,
                    "merge",
                    1,
                    f"{AGGREGATORS[name]['method']} aggregation in Flower, {fed.rounds} rounds",
                    _log_probs(model, run.final, x_val),
                    _log_probs(model, run.final, x_test),
                )
            )
        locals_ = _local_models(data, initial, fed, seed, s)
        local_val = np.concatenate(
            [_log_probs(model, st, data.x[c.val]) for st, c in zip(locals_, data.clients)]
        )
        local_test = np.concatenate(
            [_log_probs(model, st, data.x[c.test]) for st, c in zip(locals_, data.clients)]
        )
        entries.append(
            Entry(
                LOCAL,
                "individual",
                1,
                "each client's own model, trained on its training part alone, on its own "
                "held-out part",
                local_val,
                local_test,
            )
        )
        rows = compare_entries(
            entries,
            y_test,
            REFERENCE,
            n_resamples=settings.n_resamples,
            interval=settings.interval,
            seed=seed + 100 * (s + 1),
        )
        val_accuracy = {e.name: accuracy_of(e.val, y_val) for e in entries[:-1]}
        chosen = max(fed.aggregators, key=lambda n: (val_accuracy[n], -fed.aggregators.index(n)))
        splits = [
            ClientSplit(
                f"client {k}",
                locals_[k],
                torch.as_tensor(data.x[c.val]),
                torch.as_tensor(data.y[c.val]),
                torch.as_tensor(data.x[c.test]),
                torch.as_tensor(data.y[c.test]),
            )
            for k, c in enumerate(data.clients)
        ]
        personalization = Personalizer(
            model,
            alphas=settings.wise_alphas,
            n_resamples=settings.n_resamples,
            random_state=seed,
        ).fit(splits, flower.runs[(s, chosen)].final)
        scenarios.append(
            ScenarioResult(
                concentration=float(concentration),
                sizes=[(len(c.train), len(c.val), len(c.test)) for c in data.clients],
                class_counts=[
                    np.bincount(
                        data.y[np.concatenate([c.train, c.val, c.test])], minlength=10
                    ).tolist()
                    for c in data.clients
                ],
                curves={n: flower.runs[(s, n)].curve for n in fed.aggregators},
                rows=rows,
                chosen=chosen,
                personalization=personalization,
                skipped=[msg for n in fed.aggregators for msg in flower.runs[(s, n)].skipped],
            )
        )
        step(f"concentration {concentration:g}: evaluated")
    rounds = [participants(seed, r, probabilities) for r in range(1, fed.rounds + 1)]
    return FederatedStudy(
        settings=fed,
        participation=[float(p) for p in probabilities],
        rounds=rounds,
        scenarios=scenarios,
        flower=flower.details,
    )
