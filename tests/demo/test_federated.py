"""The federated scenario: the Dirichlet partition against its distribution, participation,
and a tiny run through Flower's simulation engine against the same rounds recomputed by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from modelfuse.demo.federated import (
    client_seed,
    local_sgd,
    participants,
    participation_probabilities,
    scenario_data,
)
from modelfuse.demo.partition import client_parts, dirichlet_partition
from modelfuse.demo.plots import federated_rounds_figure
from modelfuse.demo.settings import QUICK
from modelfuse.errors import ConfigError, DataError


def _is_partition(parts, n):
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_the_partition_covers_every_example_once_and_is_fixed_by_the_seed():
    labels = np.repeat(np.arange(10), 50)
    before = labels.copy()
    a = dirichlet_partition(labels, 10, 0.3, seed=1, min_size=5)
    b = dirichlet_partition(labels, 10, 0.3, seed=1, min_size=5)
    c = dirichlet_partition(labels, 10, 0.3, seed=2, min_size=5)
    assert _is_partition(a, 500)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert min(len(p) for p in a) >= 5  # every client non-empty, at least min_size
    assert all(np.array_equal(p, np.sort(p)) for p in a)
    np.testing.assert_array_equal(labels, before)


def test_class_shares_follow_the_dirichlet_marginal():
    # each client's share of a class is Beta(alpha, (K - 1) alpha): mean 1/K,
    # variance (1/K)(1 - 1/K) / (K alpha + 1); 400 classes of 400 examples
    k, alpha, n_per = 10, 0.3, 400
    labels = np.repeat(np.arange(400), n_per)
    parts = dirichlet_partition(labels, k, alpha, seed=0)
    shares = np.array([np.bincount(labels[p], minlength=400) / n_per for p in parts])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0)
    mean, variance = 1 / k, (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert shares.var() == pytest.approx(variance, rel=0.1)
    assert shares.var() > 2 * (mean * (1 - mean) / (k * 10 + 1))  # far from a concentration of 10
    # a large concentration gives every client n_c / K of each class, up to rounding
    even = dirichlet_partition(np.repeat(np.arange(3), 100), 4, 1e7, seed=0)
    for p in even:
        counts = np.bincount(np.repeat(np.arange(3), 100)[p], minlength=3)
        assert np.all(np.abs(counts - 25) <= 1)


def test_a_small_concentration_is_more_skewed_than_a_large_one():
    labels = np.repeat(np.arange(10), 180)

    def top_share(alpha):
        parts = dirichlet_partition(labels, 10, alpha, seed=3, min_size=10)
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])

    assert top_share(0.3) > 0.35 > 0.2 > top_share(10.0)


def test_one_client_gets_everything():
    (only,) = dirichlet_partition(np.array([2, 0, 1, 1]), 1, 0.5, seed=0)
    np.testing.assert_array_equal(only, [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"concentration": 0.0}, "concentration: expected a finite number above 0, got 0.0"),
        ({"concentration": float("nan")}, "concentration"),
        ({"n_clients": 0}, "n_clients: expected an integer of at least 1"),
        ({"min_size": 0}, "min_size: expected an integer of at least 1"),
        ({"min_size": 60}, "needs 600, but there are 100"),
        # one class, 10 clients, a tiny concentration: one client takes nearly all each draw
        ({"concentration": 1e-3, "min_size": 5}, "no Dirichlet draw in 1000"),
    ],
)
def test_bad_partition_settings_are_refused(kwargs, match):
    arguments = {"n_clients": 10, "concentration": 0.5, "seed": 0, "min_size": 1} | kwargs
    with pytest.raises(ConfigError, match=match):
        dirichlet_partition(np.zeros(100, dtype=np.int64), **arguments)


def test_labels_must_be_integers():
    with pytest.raises(DataError, match="labels: expected a 1-D array of integer class labels"):
        dirichlet_partition(np.zeros(10), 2, 1.0, seed=0)


def test_client_parts_are_disjoint_with_the_stated_sizes():
    index = np.arange(100, 150)
    parts = client_parts(index, seed=4)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (30, 10, 10)
    joined = np.concatenate([parts.train, parts.val, parts.test])
    np.testing.assert_array_equal(np.sort(joined), index)
    with pytest.raises(DataError, match="at least 3 examples"):
        client_parts(np.arange(2), seed=0)


def test_scenario_data_partitions_all_digits():
    data = scenario_data(0, 0.3, 10, 40)
    every = np.concatenate([np.concatenate([c.train, c.val, c.test]) for c in data.clients])
    assert len(every) == 1797 and len(np.unique(every)) == 1797
    assert min(len(c.train) + len(c.val) + len(c.test) for c in data.clients) >= 40


def test_participation_follows_each_clients_probability():
    p = np.array([0.3, 0.5, 0.9, 1.0])
    rounds = [participants(0, r, p) for r in range(1, 3001)]
    assert rounds[:5] == [participants(0, r, p) for r in range(1, 6)]  # fixed by seed and round
    freq = np.array([np.mean([k in r for r in rounds]) for k in range(4)])
    np.testing.assert_allclose(freq, p, atol=0.03)  # client 3 (p = 1) is always in
    # nobody draws below a tiny probability: the one closest to its probability joins alone
    assert [len(participants(0, r, np.full(5, 1e-9))) for r in range(1, 20)] == [1] * 19
    probabilities = participation_probabilities(0, QUICK.federated)
    assert len(probabilities) == 10 and probabilities.min() >= 0.3 and probabilities.max() <= 1


def test_the_rounds_figure_draws_one_labelled_line_per_aggregator():
    curves = {"FedAvg": [(0, 0.1, 0.2), (1, 0.5, 0.6)], "TIES": [(0, 0.1, 0.2), (1, 0.4, 0.3)]}
    figure = federated_rounds_figure([("a", curves, 0.7), ("b", curves, None)])
    for ax, local in zip(figure.axes, (True, False)):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        expected = ["FedAvg", "TIES"] + (["local models (own data only)"] if local else [])
        assert labels == expected
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["TIES"].get_ydata()) == [0.2, 0.3]  # the held-out accuracy


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from modelfuse.demo.federated import federated_study

    fed = dataclasses.replace(
        QUICK.federated,
        n_clients=3,
        concentrations=(0.5,),
        rounds=2,
        aggregators=("FedAvg", "Fisher"),
        hidden=8,
        fisher_examples=32,
    )
    settings = dataclasses.replace(QUICK, federated=fed, n_resamples=60, wise_alphas=3)
    threads = torch.get_num_threads()
    study = federated_study(settings, 5)
    return settings, study, threads


def test_flower_rounds_equal_fedavg_recomputed_by_hand(tiny):
    from modelfuse.demo.zoo import make_mlp, predict_logits

    settings, study, _ = tiny
    fed = settings.federated
    data = scenario_data(5, 0.5, 3, fed.min_client_size)
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in make_mlp(fed.hidden).state_dict().items()}
    scenario = study.scenarios[0]
    x_test, y_test = data.pooled("test")
    by_round = [state]
    for r, who in enumerate(study.rounds, start=1):
        trained, counts = [], []
        for k in who:
            net = make_mlp(fed.hidden)
            net.load_state_dict(state)
            part = data.clients[k].train
            local_sgd(
                net,
                data.x[part],
                data.y[part],
                epochs=fed.local_epochs,
                learning_rate=fed.learning_rate,
                batch_size=fed.batch_size,
                seed=client_seed(5, 0, r, k),
            )
            trained.append(net.state_dict())
            counts.append(len(part))
        total = sum(counts)
        state = {n: sum(c / total * t[n] for c, t in zip(counts, trained)) for n in state}
        by_round.append(state)
    expected = [
        float(np.mean(predict_logits(make_mlp(fed.hidden), s, x_test).argmax(1) == y_test))
        for s in by_round
    ]
    assert [r for r, _, _ in scenario.curves["FedAvg"]] == [0, 1, 2]
    assert [t for _, _, t in scenario.curves["FedAvg"]] == pytest.approx(expected, abs=1e-12)
    # the same initial model for every aggregator
    assert scenario.curves["Fisher"][0] == scenario.curves["FedAvg"][0]
    fedavg = next(r for r in scenario.rows if r.name == "FedAvg")
    assert fedavg.metrics["accuracy"][0] == pytest.approx(expected[-1])


def test_the_tiny_study_reports_every_client_and_restores_the_process(tiny):
    settings, study, threads = tiny
    scenario = study.scenarios[0]
    assert [r.name for r in scenario.rows] == ["FedAvg", "Fisher", "local models"]
    assert sum(sum(s) for s in scenario.sizes) == 1797
    assert [sum(c) for c in scenario.class_counts] == [sum(s) for s in scenario.sizes]
    names = [c.name for c in scenario.personalization.clients]
    assert names == ["client 0", "client 1", "client 2"]
    assert scenario.chosen in ("FedAvg", "Fisher")
    assert scenario.skipped == []
    assert study.flower["strategy_runs"] == 2 and study.flower["virtual_supernodes"] == 3
    assert torch.get_num_threads() == threads
    import ray

    assert not ray.is_initialized()  # the run started Ray and shut it down


def test_without_flower_the_report_says_the_scenario_was_not_run(tmp_path, monkeypatch):
    import importlib.util
    import json

    import modelfuse.demo.run as run_module
    import modelfuse.demo.settings as settings_module
    from modelfuse.demo import run_demo

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert run_module._flower_installed() is False  # Flower's engine needs Ray
    small = dataclasses.replace(
        QUICK,
        n_soup=2,
        pretrain_epochs=1,
        finetune_epochs=1,
        task_epochs=1,
        n_resamples=50,
        fisher_examples=32,
        gram_examples=32,
        lambdas=(1.0,),
        outer_splits=2,
        inner_splits=2,
        wise_alphas=3,
        caruana_rounds=2,
    )
    monkeypatch.setattr(settings_module, "settings_for", lambda quick: small)
    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert result.federated is None
    markdown = result.report.read_text()
    said = "Federated scenario: not run; Flower's simulation engine is not installed"
    assert markdown.count(said) == 2  # the summary and the scenario's section
    assert "## Federated scenario\n" in markdown
    assert json.loads((result.out / "results.json").read_text())["federated"] is None
