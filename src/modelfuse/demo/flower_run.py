"""The federated scenario's rounds, run by Flower's simulation engine.

One ``run_simulation`` (Flower 1.42's Simulation Runtime: virtual SuperNodes
whose ClientApps run in a pool of Ray actors, a ServerApp in this process)
runs every aggregator on every partition: the ServerApp first asks every
node for its partition id (a ``query`` message), then runs one
:class:`modelfuse.federated.MergeStrategy` per aggregator and partition, all
at once on the same grid (one thread each). Starting the engine and its actor
processes costs seconds, and each round waits for the engine's polling
(about 0.2 s whatever the work), so one simulation whose strategy runs share
their rounds keeps the scenario within the demo's time budget.

This module imports Flower and Ray; :mod:`modelfuse.demo.federated` imports
it only when the scenario runs.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from modelfuse.demo.federated import (
    AGGREGATORS,
    client_seed,
    local_sgd,
    participants,
    scenario_data,
)
from modelfuse.demo.settings import FederatedSettings
from modelfuse.federated.strategy import MergeStrategy

__all__ = ["FlowerRuns", "RunOutcome", "run_rounds"]

StateDict = dict[str, torch.Tensor]

_SCENARIO_KEY = "demo-scenario"
_PARTITION_KEY = "partition-id"
_TIMEOUT = 600.0
"""Seconds the server waits for a round's replies before the run fails."""


@dataclass
class RunOutcome:
    """One strategy run: the global model's accuracy per round, the final model, skipped replies."""

    curve: list[tuple[int, float, float]] = field(default_factory=list)
    final: StateDict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class FlowerRuns:
    """Every strategy run of the simulation, keyed by (partition index, aggregator)."""

    runs: dict[tuple[int, str], RunOutcome]
    details: dict[str, Any]


@dataclass(frozen=True)
class _Spec:
    """What a ClientApp needs to rebuild its data and train (small: it travels to the actors)."""

    seed: int
    concentrations: tuple[float, ...]
    n_clients: int
    min_size: int
    hidden: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    fisher_examples: int


def _train(spec: _Spec, message: Message, context: Context) -> Message:
    """A client's round: local SGD from the global model, then the reply with the statistics
    the server's method asks for."""
    from modelfuse.demo.zoo import make_mlp
    from modelfuse.federated import client_reply, client_statistics, requested_statistics

    torch.set_num_threads(1)
    client = int(context.node_config[_PARTITION_KEY])
    config = message.content["config"]
    scenario = int(config[_SCENARIO_KEY])
    server_round = int(config["server-round"])
    data = scenario_data(spec.seed, spec.concentrations[scenario], spec.n_clients, spec.min_size)
    part = data.clients[client].train
    x, y = data.x[part], data.y[part]
    model = make_mlp(spec.hidden)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    local_sgd(
        model,
        x,
        y,
        epochs=spec.local_epochs,
        learning_rate=spec.learning_rate,
        batch_size=spec.batch_size,
        seed=client_seed(spec.seed, scenario, server_round, client),
    )
    needs = requested_statistics(config)
    batches = [(torch.as_tensor(x), torch.as_tensor(y))]
    statistics = client_statistics(model, batches, needs, n_examples=spec.fisher_examples)
    return Message(content=client_reply(model, len(y), statistics=statistics), reply_to=message)


def _client_app(spec: _Spec) -> ClientApp:
    app = ClientApp()

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        client = int(context.node_config[_PARTITION_KEY])
        content = RecordDict({"node": MetricRecord({_PARTITION_KEY: client})})
        return Message(content=content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(spec, message, context)

    return app


class _DemoStrategy(MergeStrategy):
    """MergeStrategy with the demo's participation (the same clients per round for every
    aggregator) and replies put in client order, so equal seeds give equal models."""

    def __init__(
        self,
        *,
        client_of: dict[int, int],
        chosen: Callable[[int], list[int]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._client_of = client_of
        self._chosen = chosen

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        keep = set(self._chosen(server_round))
        messages = super().configure_train(server_round, arrays, config, grid)
        return [m for m in messages if self._client_of[m.metadata.dst_node_id] in keep]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        if failed:
            client = self._client_of.get(failed[0].metadata.src_node_id)
            raise RuntimeError(
                f"federated scenario: round {server_round}: client {client}'s ClientApp "
                f"failed: {failed[0].error.reason[:300]}"
            )
        expected = len(self._chosen(server_round))
        if len(replies) != expected:
            raise RuntimeError(
                f"federated scenario: round {server_round}: {len(replies)} of {expected} "
                f"clients replied within {_TIMEOUT:.0f} s"
            )
        replies.sort(key=lambda r: self._client_of[r.metadata.src_node_id])
        return super().aggregate_train(server_round, replies)


class _Stopped(Exception):
    """The simulation was interrupted: the ServerApp's threads end instead of waiting."""


class _StoppableGrid:
    """Flower's grid, whose ``send_and_receive`` stops waiting once ``stop`` is set.

    Flower's own waits up to its timeout however the simulation ended, and the
    ServerApp's thread keeps the process alive meanwhile (after Ctrl-C, say);
    this one pushes and pulls through the grid's public methods and checks
    ``stop`` between pulls. Everything else is the grid's.
    """

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (_TIMEOUT if timeout is None else timeout)
        replies: list[Message] = []
        while pending:
            if self._stop.is_set():
                raise _Stopped("federated scenario: the simulation was stopped")
            received = list(self._grid.pull_messages(pending))
            replies.extend(received)
            pending -= {m.metadata.reply_to_message_id for m in received}
            if not pending or time.monotonic() > deadline:
                break
            self._stop.wait(0.1)
        return replies


def _wait_for_nodes(grid: Grid, n: int, stop: threading.Event) -> list[int]:
    """The node ids once ``n`` virtual SuperNodes are registered (the engine registers them
    after the ServerApp has started)."""
    deadline = time.monotonic() + _TIMEOUT
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if stop.is_set():
            raise _Stopped("federated scenario: the simulation was stopped")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"federated scenario: {len(nodes)} of {n} virtual SuperNodes registered "
                f"within {_TIMEOUT:.0f} s"
            )
        stop.wait(0.05)
    return nodes


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == y))


def _server_app(
    fed: FederatedSettings,
    seed: int,
    initial: StateDict,
    probabilities: np.ndarray,
    runs: dict[tuple[int, str], RunOutcome],
    on_round: Callable[[str], None],
    stop: threading.Event,
) -> ServerApp:
    from modelfuse.demo.zoo import make_mlp, predict_logits

    app = ServerApp()

    @app.main()
    def main(flower_grid: Grid, context: Context) -> None:
        grid = _StoppableGrid(flower_grid, stop)
        nodes = _wait_for_nodes(flower_grid, fed.n_clients, stop)
        queries = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        answers = list(grid.send_and_receive(queries, timeout=_TIMEOUT))
        client_of = {
            a.metadata.src_node_id: int(a.content["node"][_PARTITION_KEY])
            for a in answers
            if not a.has_error()
        }
        if sorted(client_of.values()) != list(range(fed.n_clients)):
            raise RuntimeError(
                f"federated scenario: {len(client_of)} of {fed.n_clients} nodes told their "
                "partition id"
                + "".join(f"; {a.error.reason[:300]}" for a in answers[:1] if a.has_error())
            )

        def chosen(server_round: int) -> list[int]:
            return participants(seed, server_round, probabilities)

        def run_one(s: int, name: str) -> None:
            concentration = fed.concentrations[s]
            data = scenario_data(seed, concentration, fed.n_clients, fed.min_client_size)
            x_val, y_val = data.pooled("val")
            x_test, y_test = data.pooled("test")
            model = make_mlp(fed.hidden)
            outcome = runs[(s, name)]
            label = f"{name}, concentration {concentration:g}"

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                state = arrays.to_torch_state_dict()
                val = _accuracy(predict_logits(model, state, x_val), y_val)
                test = _accuracy(predict_logits(model, state, x_test), y_test)
                outcome.curve.append((server_round, val, test))
                if server_round > 0:
                    on_round(f"{label}: round {server_round}")
                return MetricRecord({"val-accuracy": val, "test-accuracy": test})

            strategy = _DemoStrategy(
                client_of=client_of,
                chosen=chosen,
                fraction_evaluate=0.0,
                min_available_nodes=fed.n_clients,
                **AGGREGATORS[name],
            )
            result = strategy.start(
                grid=grid,  # type: ignore[arg-type]
                initial_arrays=ArrayRecord({k: v.clone() for k, v in initial.items()}),
                num_rounds=fed.rounds,
                timeout=_TIMEOUT,
                train_config=ConfigRecord({_SCENARIO_KEY: s}),
                evaluate_fn=evaluate,
            )
            outcome.final = {k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}
            outcome.skipped = [str(skipped) for skipped in strategy.skipped_]

        # every strategy run drives its own rounds on the same grid at the same time: their
        # messages share the engine's polling intervals, and each run's result depends only
        # on its own messages (replies are put in client order)
        jobs = [(s, name) for s in range(len(fed.concentrations)) for name in fed.aggregators]
        for job in jobs:
            runs[job] = RunOutcome()
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="demo-strategy") as pool:
            futures = [pool.submit(run_one, s, name) for s, name in jobs]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()  # one run failed: the others stop waiting for their replies
                raise

    return app


@contextmanager
def _quiet_engine() -> Iterator[None]:
    """Flower's and Ray's console output off, no telemetry or usage statistics sent (unless
    the environment asks for them), and everything changed restored afterwards, except
    Flower's telemetry switch: Flower sends its run events from threads that may still run
    when this returns, so it stays off in this process unless ``FLWR_TELEMETRY_ENABLED`` is
    set. Ray is shut down when this run started it."""
    import ray
    from flwr.supercore import telemetry

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    saved_env = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    started_ray = not ray.is_initialized()
    flwr_logger.setLevel(logging.ERROR)
    if "FLWR_TELEMETRY_ENABLED" not in os.environ:
        telemetry.FLWR_TELEMETRY_ENABLED = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Tip: In future versions of Ray", category=FutureWarning
            )
            # Ray's own files and process handles, closed or reaped by ray.shutdown
            warnings.filterwarnings("ignore", category=ResourceWarning)
            try:
                yield
            finally:
                if started_ray:  # also after an interrupted start: it stops what was started
                    ray.shutdown()
                gc.collect()  # Ray's process handles are collected while their warning is off
    finally:
        flwr_logger.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_rounds(
    fed: FederatedSettings,
    seed: int,
    initial: StateDict,
    probabilities: np.ndarray,
    *,
    on_round: Callable[[str], None],
) -> FlowerRuns:
    """Every aggregator on every partition, ``fed.rounds`` rounds each, in one Flower simulation.

    Raises
    ------
    RuntimeError
        A ClientApp failed, or clients did not reply: the scenario does not
        report on a federation that did not run as described.
    """
    import flwr
    from flwr.simulation import run_simulation

    spec = _Spec(
        seed=seed,
        concentrations=tuple(float(c) for c in fed.concentrations),
        n_clients=fed.n_clients,
        min_size=fed.min_client_size,
        hidden=fed.hidden,
        local_epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        learning_rate=fed.learning_rate,
        fisher_examples=fed.fisher_examples,
    )
    runs: dict[tuple[int, str], RunOutcome] = {}
    # two CPUs per ClientApp actor: one actor on a two-core machine. A client's round takes
    # milliseconds, while each actor process costs seconds to start (it imports torch and
    # Flower), which competes with this process for the cores
    backend_config = {
        "client_resources": {"num_cpus": 2, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    stop = threading.Event()
    with _quiet_engine():
        try:
            run_simulation(
                server_app=_server_app(fed, seed, initial, probabilities, runs, on_round, stop),
                client_app=_client_app(spec),
                num_supernodes=fed.n_clients,
                backend_name="ray",
                backend_config=backend_config,
            )
        finally:
            stop.set()  # a ServerApp thread still waiting (after Ctrl-C) ends now
    missing = [
        key
        for key in ((s, n) for s in range(len(fed.concentrations)) for n in fed.aggregators)
        if key not in runs or not runs[key].final
    ]
    if missing:
        raise RuntimeError(
            f"federated scenario: the simulation ended without the runs {missing[:3]} "
            "(partition index, aggregator)"
        )
    details = {
        "flower": flwr.__version__,
        "engine": "flwr.simulation.run_simulation (Simulation Runtime)",
        "backend": "ray",
        "virtual_supernodes": fed.n_clients,
        "strategy_runs": len(runs),
    }
    return FlowerRuns(runs, details)
