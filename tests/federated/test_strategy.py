"""MergeStrategy on Flower messages, against Flower's own FedAvg and FedAvgM."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedAvgM  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from modelfuse.errors import ConfigError, DataError  # noqa: E402
from modelfuse.federated import (  # noqa: E402
    STATISTICS_KEY,
    MergeStrategy,
    client_reply,
    client_update,
    requested_statistics,
)


class _Grid:
    """The part of Flower's Grid a strategy's configure_train uses."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages are stamped with the running task's identity (set by Flower's runtime)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _reply(node: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content, metadata=metadata)


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(8, 6, generator=g) * scale,
        "0.bias": torch.randn(8, generator=g) * scale,
        "2.weight": torch.randn(3, 8, generator=g) * scale,
    }


def _round(strategy, global_state, clients, server_round=1):
    arrays = ArrayRecord({k: v.clone() for k, v in global_state.items()})
    messages = list(
        strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(range(1, 9)))
    )
    replies = [_reply(node, content) for node, content in clients]
    return messages, strategy.aggregate_train(server_round, replies)


def _clients(global_state, examples=(12, 40, 7), rnd=0):
    out = []
    for i, n in enumerate(examples):
        delta = _state(100 * rnd + i + 1, 0.1)
        state = {k: global_state[k] + delta[k] for k in global_state}
        out.append((i + 1, client_reply(state, n, metrics={"train-loss": float(i)})))
    return out


def test_linear_equals_flowers_fedavg_to_float32_rounding():
    global_state = _state(0)
    clients = _clients(global_state)
    _, (arrays, metrics) = _round(MergeStrategy(method="linear"), global_state, clients)
    reference = aggregate_arrayrecords([c for _, c in clients], "num-examples")
    for name in global_state:
        ours, theirs = arrays[name].numpy(), reference[name].numpy()
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-6)
    expected_loss = (12 * 0 + 40 * 1 + 7 * 2) / 59
    assert metrics["train-loss"] == pytest.approx(expected_loss)


def test_linear_equals_flowers_fedavg_strategy_end_to_end():
    global_state = _state(0)
    clients = _clients(global_state)
    _, (arrays, _) = _round(MergeStrategy(), global_state, clients)
    theirs, _ = FedAvg().aggregate_train(1, [_reply(n, c) for n, c in clients])
    for name in global_state:
        np.testing.assert_allclose(arrays[name].numpy(), theirs[name].numpy(), rtol=2e-6, atol=1e-6)


def test_fedavgm_equals_flowers_fedavgm_over_three_rounds():
    ours = MergeStrategy(method="fedavgm", server_learning_rate=0.8, server_momentum=0.9)
    theirs = FedAvgM(server_learning_rate=0.8, server_momentum=0.9)
    current_ours = current_theirs = _state(0)
    for r in range(1, 4):
        clients = _clients(current_ours, rnd=r)
        _, (arrays, _) = _round(ours, current_ours, clients, server_round=r)
        list(
            theirs.configure_train(r, ArrayRecord(current_theirs), ConfigRecord(), _Grid([1, 2, 3]))
        )
        reference, _ = theirs.aggregate_train(r, [_reply(n, c) for n, c in clients])
        current_ours = {k: torch.from_numpy(arrays[k].numpy()) for k in arrays}
        current_theirs = {k: torch.from_numpy(reference[k].numpy()) for k in reference}
        for name in current_ours:
            torch.testing.assert_close(
                current_ours[name], current_theirs[name], rtol=1e-5, atol=1e-5
            )


def test_training_messages_ask_for_the_statistics_the_method_reads():
    for method, expected in [
        ("linear", ()),
        ("fisher", ("fisher",)),
        ("regmean", ("gram",)),
        ("uncertainty", ("variance",)),
    ]:
        messages, _ = _round(MergeStrategy(method=method), _state(0), [])
        config = messages[0].content["config"]
        assert requested_statistics(config) == expected
        assert config["server-round"] == 1


def test_fisher_from_replies_with_equal_statistics_equals_fedavg():
    global_state = _state(0)
    fisher = {k: torch.rand(v.shape) + 0.5 for k, v in global_state.items()}
    plain = _clients(global_state)
    clients = []
    for node, content in plain:
        state = {k: torch.from_numpy(content["arrays"][k].numpy()) for k in global_state}
        n = int(content["metrics"]["num-examples"])
        clients.append((node, client_reply(state, n, statistics={"fisher": fisher})))
    _, (arrays, _) = _round(MergeStrategy(method="fisher"), global_state, clients)
    # Flower's average adds up every ArrayRecord of a reply: given the replies without Fisher
    reference = aggregate_arrayrecords([c for _, c in plain], "num-examples")
    for name in global_state:
        np.testing.assert_allclose(
            arrays[name].numpy(), reference[name].numpy(), rtol=1e-5, atol=1e-6
        )


def test_a_nan_client_is_skipped_named_and_logged(caplog):
    global_state = _state(0)
    clients = _clients(global_state)
    poisoned = {k: v.clone() for k, v in global_state.items()}
    poisoned["0.bias"][0] = float("nan")
    clients.append((42, client_reply(poisoned, 1000)))
    strategy = MergeStrategy()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, (arrays, _) = _round(strategy, global_state, clients)
    reason = "tensor '0.bias' has 1 NaN or inf values of 8"
    assert [(s.client, s.reason) for s in strategy.skipped_] == [("node 42", reason)]
    assert f"round 1: client node 42 skipped: {reason}" in caplog.text
    reference = aggregate_arrayrecords([c for _, c in clients[:3]], "num-examples")
    for name in global_state:
        np.testing.assert_allclose(
            arrays[name].numpy(), reference[name].numpy(), rtol=2e-6, atol=1e-6
        )


def test_a_nan_client_is_refused_in_one_line_with_raise():
    global_state = _state(0)
    clients = _clients(global_state)
    poisoned = {k: v.clone() for k, v in global_state.items()}
    poisoned["2.weight"][:] = float("inf")
    clients.append((42, client_reply(poisoned, 5)))
    with pytest.raises(DataError) as error:
        _round(MergeStrategy(on_failure="raise"), global_state, clients)
    assert str(error.value) == (
        "round 1: client node 42 tensor '2.weight' has 24 NaN or inf values of 24; fix the "
        "client, or set on-failure to skip to leave such clients out of the round"
    )


def test_replies_without_model_or_example_count_are_skipped():
    global_state = _state(0)
    clients = _clients(global_state)
    no_count = RecordDict(
        {"arrays": clients[0][1]["arrays"], "metrics": MetricRecord({"loss": 1.0})}
    )
    no_model = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    strategy = MergeStrategy()
    _, (arrays, _) = _round(strategy, global_state, [*clients, (50, no_count), (51, no_model)])
    reasons = {s.client: s.reason for s in strategy.skipped_}
    assert reasons == {
        "node 50": "reported None examples; expected a positive number",
        "node 51": "misses tensors of the global model: '0.bias', '0.weight', '2.weight'",
    }
    assert arrays is not None


def test_a_reply_with_a_corrupt_array_is_skipped():
    """An Array whose declared shape disagrees with its data, as a crafted reply could send."""
    global_state = _state(0)
    clients = _clients(global_state, examples=(5, 5))
    arrays = clients[1][1]["arrays"]
    good = arrays["0.bias"]
    arrays["0.bias"] = Array(
        dtype=good.dtype,
        shape=good.shape,
        stype=good.stype,
        data=Array(np.zeros(3, dtype=np.float32)).data,
    )
    strategy = MergeStrategy()
    _round(strategy, global_state, clients)
    assert [(s.client, s.reason) for s in strategy.skipped_] == [
        ("node 2", "tensor '0.bias' holds data of another shape than it declares")
    ]


def test_all_clients_skipped_leaves_the_global_model():
    global_state = _state(0)
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in global_state.items()}
    strategy = MergeStrategy()
    _, (arrays, metrics) = _round(strategy, global_state, [(1, client_reply(poisoned, 3))])
    assert arrays is None and metrics is None


def test_error_replies_are_left_to_flower_and_not_aggregated():
    from flwr.app import Error

    global_state = _state(0)
    clients = _clients(global_state)
    failed = Message(Error(code=0, reason="client crashed"), reply_to=_reply(9, RecordDict()))
    _, (arrays, _) = _round(MergeStrategy(), global_state, clients)
    strategy = MergeStrategy()
    list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), _Grid(range(9))))
    again, _ = strategy.aggregate_train(1, [*[_reply(n, c) for n, c in clients], failed])
    assert strategy.skipped_ == []
    for name in global_state:
        np.testing.assert_array_equal(arrays[name].numpy(), again[name].numpy())


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ConfigError, match="^MergeStrategy: method: unknown aggregation 'krum'"):
        MergeStrategy(method="krum")
    with pytest.raises(ConfigError, match="density: Input should be less than or equal to 1"):
        MergeStrategy({"method": "ties", "density": 2})


def test_client_update_reads_a_reply_without_copying():
    content = client_reply(
        _state(0), 17, statistics={"variance": 0.25, "gram": {"2.weight": torch.eye(8)}}
    )
    update = client_update(_reply(5, content))
    assert update.client == "node 5" and update.num_examples == 17 and update.variance == 0.25
    assert update.arrays is content["arrays"] and update.gram is content["gram"]
    assert STATISTICS_KEY == "modelfuse-statistics"
