"""Sharded statistics equal one run over all the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.executors import LocalExecutor
from modelfuse.statistics import (
    Statistics,
    combine_shards,
    fisher_diagonal,
    gram_matrices,
    shard_batches,
    sharded_statistics,
)


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(24, 4), torch.randint(0, 3, (24,))


def _shards(x: torch.Tensor, y: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    # unequal shards, several batches in one
    return [[(x[:7], y[:7])], [(x[7:12], y[7:12]), (x[12:20], y[12:20])], [(x[20:], y[20:])]]


@pytest.mark.parametrize("kind, workers", [("exact", 2), ("empirical", 1)])
def test_fisher_shards_equal_one_run(kind: str, workers: int) -> None:
    model, x, y = _data()
    whole = fisher_diagonal(model, [(x, y)], kind=kind)
    split = sharded_statistics(
        "fisher", model, _shards(x, y), executor=LocalExecutor(workers), kind=kind
    )
    assert split.n_examples == 24 and split.kind == "fisher" and split.estimator == kind
    assert list(split) == list(whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)


def test_gram_shards_equal_closed_form() -> None:
    model, x, y = _data()
    split = sharded_statistics("gram", model, _shards(x, y), executor=LocalExecutor(1))
    hidden = torch.tanh(model[0](x)).detach()
    torch.testing.assert_close(split["0.weight"], x.T @ x / 24, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["2.weight"], hidden.T @ hidden / 24, rtol=1e-5, atol=1e-6)
    assert split.n_examples == 24


def test_combine_shards_hand_worked() -> None:
    a = Statistics({"w": torch.tensor([1.0, 0.0])}, kind="gram", n_examples=2)
    b = Statistics({"w": torch.tensor([4.0, 8.0])}, kind="gram", n_examples=6)
    # (2 * 1 + 6 * 4) / 8 = 3.25; (0 + 6 * 8) / 8 = 6
    torch.testing.assert_close(combine_shards([a, b])["w"], torch.tensor([3.25, 6.0]))


def test_bad_shards_are_refused() -> None:
    model, x, y = _data()
    with pytest.raises(
        ConfigError, match="statistic: unknown statistic 'hessian'; valid: fisher, gram"
    ):
        sharded_statistics("hessian", model, _shards(x, y))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shards: expected at least one shard"):
        sharded_statistics("fisher", model, [])
    f = Statistics({"w": torch.ones(2)}, kind="fisher", n_examples=2, estimator="exact")
    g = Statistics({"w": torch.ones(2)}, kind="gram", n_examples=2)
    with pytest.raises(ConfigError, match="shard 1 holds gram/None statistics"):
        combine_shards([f, g])
    h = Statistics({"w": torch.ones(3)}, kind="fisher", n_examples=2, estimator="exact")
    with pytest.raises(ConfigError, match="shard 1 has other tensor names or shapes"):
        combine_shards([f, h])


def test_gram_shards_of_different_sequence_lengths_equal_one_run() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)  # on (batch, positions, features): every position is a row
    short, long = torch.randn(4, 2, 3), torch.randn(2, 5, 3)  # 8 rows, then 10 rows
    # closed form: every position is a row, G = (sum of x x^T over all 18 rows) / 18
    rows = torch.cat([short.reshape(-1, 3), long.reshape(-1, 3)]).double()
    expected = (rows.T @ rows / 18).float()
    split = sharded_statistics("gram", model, [[short], [long]], executor=LocalExecutor(1))
    torch.testing.assert_close(split["weight"], expected, rtol=1e-6, atol=1e-7)
    assert split.n_examples == 6
    # the mean of per-shard Grams weighted by examples would be wrong here: 4/6 and 2/6
    naive = combine_shards([gram_matrices(model, [short]), gram_matrices(model, [long])])
    assert not torch.allclose(naive["weight"], expected, rtol=1e-3)


def test_shard_batches_hand_worked() -> None:
    x = torch.arange(14.0).reshape(7, 2)
    y = torch.arange(7)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    # 6 examples kept, 3 shards of 2: the first batch is cut after example 2
    shards = shard_batches(batches, 3, n_examples=6)
    assert [[b[1].tolist() for b in shard] for shard in shards] == [[[0, 1]], [[2, 3]], [[4, 5]]]
    assert [[b[0][:, 0].tolist() for b in shard] for shard in shards] == [
        [[0.0, 2.0]], [[4.0, 6.0]], [[8.0, 10.0]]
    ]
    # more shards than examples: one example each; mappings stay mappings
    mapped = shard_batches([{"ids": x[:2], "mask": y[:2]}], 5, n_examples=10)
    assert [[b["mask"].tolist() for b in shard] for shard in mapped] == [[[0]], [[1]]]
    with pytest.raises(ConfigError, match="n_shards: expected a positive integer, received 0"):
        shard_batches(batches, 0, n_examples=6)


@pytest.mark.parametrize("statistic", ["fisher", "gram"])
def test_shard_batches_then_sharded_equals_one_run(statistic: str) -> None:
    model, x, y = _data()
    whole = (fisher_diagonal if statistic == "fisher" else gram_matrices)(
        model, [(x[:10], y[:10]), (x[10:], y[10:])], n_examples=20
    )
    shards = shard_batches([(x[:10], y[:10]), (x[10:], y[10:])], 3, n_examples=20)
    split = sharded_statistics(statistic, model, shards, n_examples=20)
    assert split.n_examples == whole.n_examples == 20
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)


def test_shards_hold_their_own_examples_only() -> None:
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    shards = shard_batches([(x[:60], y[:60]), (x[60:], y[60:])], 4, n_examples=100)
    for shard in shards:
        for inputs, labels in shard:
            # a view of x would pickle all of x to its worker
            assert inputs.untyped_storage().nbytes() == inputs.numel() * 4
            assert labels.untyped_storage().nbytes() == labels.numel() * 8
    assert torch.equal(torch.cat([b[0] for shard in shards for b in shard]), x)
