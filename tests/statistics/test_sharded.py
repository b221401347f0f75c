"""Sharded statistics equal one run over all the data."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.executors import LocalExecutor, RayExecutor
from modelfuse.statistics import Statistics, combine_shards, fisher_diagonal, sharded_statistics


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(24, 4), torch.randint(0, 3, (24,))


def _shards(x: torch.Tensor, y: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    # unequal shards, several batches in one
    return [[(x[:7], y[:7])], [(x[7:12], y[7:12]), (x[12:20], y[12:20])], [(x[20:], y[20:])]]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_shards_equal_one_run(workers: int, kind: str) -> None:
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
    split = sharded_statistics("gram", model, _shards(x, y), executor=LocalExecutor(2))
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


def test_sharded_fisher_on_ray_two_workers() -> None:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    model, x, y = _data()
    whole = fisher_diagonal(model, [(x, y)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        split = sharded_statistics("fisher", model, _shards(x, y), executor=RayExecutor())
    finally:
        ray.shutdown()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)
