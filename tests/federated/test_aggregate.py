"""The aggregation core without Flower: each method against its formula written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError, DataError
from modelfuse.federated import (
    AGGREGATORS,
    AggregationSettings,
    ClientUpdate,
    ServerState,
    aggregate,
    prepare_round,
    settings,
    trajectory_variance,
)
from modelfuse.merge import merge_state_dicts


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(5, 4, generator=g) * scale,
        "fc.bias": torch.randn(5, generator=g) * scale,
    }


def _updates(n: int = 3, examples=(10, 30, 60)) -> tuple[dict, list[ClientUpdate]]:
    base = _model(0)
    updates = []
    for i in range(n):
        delta = _model(100 + i, 0.1)
        state = {k: base[k] + delta[k] for k in base}
        updates.append(ClientUpdate(f"c{i}", state, num_examples=examples[i]))
    return base, updates


def _weighted(updates, weights) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        k: sum(w * u.arrays[k].double() for u, w in zip(updates, weights)) / total
        for k in updates[0].arrays
    }


def _close(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=tol, atol=tol)


def test_linear_is_the_example_weighted_average():
    base, updates = _updates()
    out = aggregate(base, updates, AggregationSettings(method="linear"))
    _close(out, _weighted(updates, [10, 30, 60]))
    assert out["fc.weight"].dtype == torch.float32


def test_inputs_are_not_modified():
    base, updates = _updates()
    before = [{k: v.clone() for k, v in u.arrays.items()} for u in updates]
    global_before = {k: v.clone() for k, v in base.items()}
    for method in ("linear", "fedavgm", "ties", "residual"):
        aggregate(base, updates, settings(method=method))
    for u, b in zip(updates, before):
        _close(dict(u.arrays), b, tol=0)
    _close(base, global_before, tol=0)


def test_numpy_arrays_are_accepted():
    base, updates = _updates()
    as_numpy = [
        ClientUpdate(u.client, {k: v.numpy() for k, v in u.arrays.items()}, u.num_examples)
        for u in updates
    ]
    out = aggregate({k: v.numpy() for k, v in base.items()}, as_numpy, AggregationSettings())
    _close(out, _weighted(updates, [10, 30, 60]))


def test_fedavgm_follows_the_momentum_formula_over_three_rounds():
    lr, beta = 0.7, 0.9
    config = AggregationSettings(method="fedavgm", server_learning_rate=lr, server_momentum=beta)
    state = ServerState()
    current = _model(0)
    velocity = None
    for r in range(1, 4):
        updates = []
        for i, n in enumerate((5, 15)):
            delta = _model(10 * r + i, 0.1)
            updates.append(ClientUpdate(f"c{i}", {k: current[k] + delta[k] for k in current}, n))
        out = aggregate(current, updates, config, state=state, server_round=r)
        average = _weighted(updates, [5, 15])
        pseudo = {k: current[k].double() - average[k] for k in current}
        velocity = (
            pseudo if velocity is None else {k: beta * velocity[k] + pseudo[k] for k in pseudo}
        )
        expected = {k: current[k].double() - lr * velocity[k] for k in current}
        _close(out, expected, tol=1e-5)
        current = out


def test_fedau_follows_the_participation_formula():
    """x_{t+1} = x_t + eta / N * sum_{i in S_t} omega_i (theta_i - x_t), with omega_i the mean
    interval between client i's participations estimated online (cut at K)."""
    eta, cutoff = 1.0, 3
    config = AggregationSettings(
        method="fedau", server_learning_rate=eta, participation_cutoff=cutoff
    )
    clients = ["a", "b", "c"]
    # a takes part every round, b every other round, c never (it hits the cutoff)
    schedule = [["a", "b"], ["a"], ["a", "b"], ["a"], ["a", "b"]]
    state = ServerState()
    current = {"w": torch.zeros(3)}
    # the estimates written out by hand, before each round:
    # round 1: a 1, b 1; after: a interval 1 -> 1; b 1 -> 1; c elapsed 1
    # round 2: a 1;      after: a 1; b elapsed 1; c elapsed 2
    # round 3: a 1, b 1; after: a 1; b: (1 * 1 + 2) / 2 = 1.5; c elapsed 3 = K -> omega 3
    # round 4: a 1;      round 5: a 1, b 1.5
    omegas = {
        1: {"a": 1.0, "b": 1.0},
        2: {"a": 1.0},
        3: {"a": 1.0, "b": 1.0},
        4: {"a": 1.0},
        5: {"a": 1.0, "b": 1.5},
    }
    for r, present in enumerate(schedule, start=1):
        targets = {
            "a": torch.tensor([1.0, 0.0, 0.0]),
            "b": torch.tensor([0.0, 2.0, 0.0]) + r,
        }
        updates = [ClientUpdate(c, {"w": targets[c]}, num_examples=1) for c in present]
        out = aggregate(current, updates, config, state=state, server_round=r, clients=clients)
        step = sum(omegas[r][c] * (targets[c] - current["w"]) for c in present) / len(clients)
        torch.testing.assert_close(out["w"], current["w"] + eta * step)
        current = out
    assert state.participation["c"].weight == 3.0
    assert state.participation["b"].weight == pytest.approx((2 * 1.5 + 2) / 3)


def test_ties_over_updates_is_modelfuses_ties_on_the_same_updates():
    base, updates = _updates()
    config = AggregationSettings(method="ties", density=0.4, scale=0.8)
    out = aggregate(base, updates, config)
    total = sum(u.num_examples for u in updates)
    expected = merge_state_dicts(
        "ties",
        [u.arrays for u in updates],
        base=base,
        weights=[u.num_examples / total for u in updates],
        density=0.4,
        lambda_=0.8,
        normalize=True,
    )
    _close(out, expected, tol=0)


def test_breadcrumbs_over_updates_is_modelfuses_breadcrumbs():
    base, updates = _updates()
    out = aggregate(
        base, updates, AggregationSettings(method="breadcrumbs", density=0.6, gamma=0.1)
    )
    total = sum(u.num_examples for u in updates)
    expected = merge_state_dicts(
        "breadcrumbs",
        [u.arrays for u in updates],
        base=base,
        weights=[u.num_examples / total for u in updates],
        density=0.6,
        gamma=0.1,
        normalize=True,
    )
    _close(out, expected, tol=0)


def test_dare_ties_at_density_one_is_ties_without_trimming():
    base, updates = _updates()
    dare = aggregate(base, updates, AggregationSettings(method="dare_ties", density=1.0))
    ties = aggregate(base, updates, AggregationSettings(method="ties", density=1.0))
    _close(dare, ties)


def test_dare_ties_is_seeded():
    base, updates = _updates()
    config = AggregationSettings(method="dare_ties", density=0.5, seed=3)
    a = aggregate(base, updates, config, server_round=2)
    b = aggregate(base, updates, config, server_round=2)
    c = aggregate(base, updates, config, server_round=3)
    _close(a, b, tol=0)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_fisher_with_equal_statistics_is_fedavg():
    base, updates = _updates()
    fisher = {
        k: torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) + 0.1
        for k, v in base.items()
    }
    with_fisher = [ClientUpdate(u.client, u.arrays, u.num_examples, fisher=fisher) for u in updates]
    out = aggregate(base, with_fisher, AggregationSettings(method="fisher"))
    _close(out, _weighted(updates, [10, 30, 60]), tol=1e-5)


def test_fisher_weights_each_entry_by_examples_times_fisher():
    base = {"w": torch.zeros(2)}
    a = ClientUpdate(
        "a", {"w": torch.tensor([0.0, 0.0])}, 1, fisher={"w": torch.tensor([1.0, 3.0])}
    )
    b = ClientUpdate(
        "b", {"w": torch.tensor([4.0, 4.0])}, 2, fisher={"w": torch.tensor([3.0, 1.0])}
    )
    out = aggregate(base, [a, b], AggregationSettings(method="fisher"))
    # entry 0: (1*1*0 + 2*3*4) / (1 + 6) = 24/7; entry 1: (2*1*4) / (3 + 2) = 8/5
    torch.testing.assert_close(out["w"], torch.tensor([24 / 7, 8 / 5]))


def test_regmean_is_the_least_squares_fit_with_example_weighted_grams():
    torch.manual_seed(0)
    base = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    xs = [torch.randn(20, 3), torch.randn(40, 3) * 2]
    ws = [torch.randn(2, 3), torch.randn(2, 3)]
    bs = [torch.randn(2), torch.randn(2)]
    updates = [
        ClientUpdate(f"c{i}", {"w": ws[i], "b": bs[i]}, len(x), gram={"w": x.T @ x / len(x)})
        for i, x in enumerate(xs)
    ]
    out = aggregate(base, updates, AggregationSettings(method="regmean", regmean_alpha=1.0))
    # exact least squares over the union of the clients' inputs
    x = torch.cat(xs).double()
    y = torch.cat([xs[i].double() @ ws[i].double().T for i in range(2)])
    solution = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(out["w"].double(), solution, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["b"], (20 * bs[0] + 40 * bs[1]) / 60)


def test_uncertainty_weights_are_examples_over_variance():
    base, updates = _updates()
    variances = [0.5, 2.0, 1.0]
    with_variance = [
        ClientUpdate(u.client, u.arrays, u.num_examples, variance=v)
        for u, v in zip(updates, variances)
    ]
    out = aggregate(base, with_variance, AggregationSettings(method="uncertainty"))
    _close(out, _weighted(updates, [10 / 0.5, 30 / 2.0, 60 / 1.0]))
    equal = [ClientUpdate(u.client, u.arrays, u.num_examples, variance=0.3) for u in updates]
    _close(aggregate(base, equal, settings(method="uncertainty")), _weighted(updates, [10, 30, 60]))


def test_uncertainty_from_fisher_mass():
    base, updates = _updates()
    masses = [1.0, 4.0, 0.5]
    with_fisher = [
        ClientUpdate(
            u.client,
            u.arrays,
            u.num_examples,
            fisher={k: torch.full(v.shape, m) for k, v in base.items()},
        )
        for u, m in zip(updates, masses)
    ]
    config = settings(method="uncertainty", uncertainty_source="fisher")
    out = aggregate(base, with_fisher, config)
    _close(out, _weighted(updates, [10 * 1.0, 30 * 4.0, 60 * 0.5]))


def test_residual_downweights_the_client_far_from_the_consensus():
    base = {"w": torch.zeros(4)}
    near = [
        torch.tensor([1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1.2, 0.8, 1.0, 1.0]),
        torch.tensor([0.9, 1.1, 1.0, 1.0]),
    ]
    far = torch.tensor([10.0, -10.0, 10.0, 10.0])
    models = [*near, far]
    updates = [ClientUpdate(f"c{i}", {"w": m}, 1) for i, m in enumerate(models)]
    c = 2.0
    out = aggregate(base, updates, AggregationSettings(method="residual", residual_threshold=c))
    stacked = torch.stack(models)
    median = stacked.sort(0).values[1:3].mean(0)  # four clients: the mean of the middle two
    r = [float(torch.linalg.vector_norm(m - median)) for m in models]
    s = float(np.median(r))
    h = [1.0 if ri <= c * s else c * s / ri for ri in r]
    assert h[3] < 0.2 and h[:3] == [1.0, 1.0, 1.0]
    expected = sum(hi * m for hi, m in zip(h, models)) / sum(h)
    torch.testing.assert_close(out["w"], expected)


def test_integer_buffers_are_averaged_and_rounded():
    base = {"w": torch.zeros(1), "count": torch.tensor(0)}
    a = ClientUpdate("a", {"w": torch.ones(1), "count": torch.tensor(10)}, 1)
    b = ClientUpdate("b", {"w": torch.ones(1), "count": torch.tensor(13)}, 1)
    out = aggregate(base, [a, b], settings(method="ties"))
    assert out["count"].dtype == torch.int64 and int(out["count"]) == 12


# --- bad replies: skipped and named, or refused in one line ---------------------------------


def _bad_replies():
    base, updates = _updates()
    nan = {k: v.clone() for k, v in updates[1].arrays.items()}
    nan["fc.bias"][2] = float("nan")
    wrong_shape = {**updates[2].arrays, "fc.bias": torch.zeros(6)}
    return base, updates, nan, wrong_shape


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("nan", "tensor 'fc.bias' has 1 NaN or inf values of 5"),
        ("shape", "tensor 'fc.bias' has shape [6], the global model's has [5]"),
        ("missing", "misses tensors of the global model: 'fc.bias'"),
        ("extra", "sent tensors the global model has not: 'extra'"),
        ("examples", "reported 0 examples; expected a positive number"),
        ("inf_examples", "reported nan examples; expected a positive number"),
    ],
)
def test_a_bad_client_is_skipped_and_named(field, reason):
    base, updates, nan, wrong_shape = _bad_replies()
    good = updates[0]
    arrays, n = dict(good.arrays), 7
    if field == "nan":
        arrays = nan
    elif field == "shape":
        arrays = wrong_shape
    elif field == "missing":
        arrays = {"fc.weight": good.arrays["fc.weight"]}
    elif field == "extra":
        arrays = {**good.arrays, "extra": torch.zeros(1)}
    elif field == "examples":
        n = 0
    else:
        n = float("nan")
    bad = ClientUpdate("bad", arrays, n)
    prepared = prepare_round(base, [good, bad], AggregationSettings())
    assert [(s.client, s.reason) for s in prepared.skipped] == [("bad", reason)]
    _close(dict(prepared.tensors()), dict(good.arrays))
    with pytest.raises(DataError) as error:
        prepare_round(base, [good, bad], AggregationSettings(on_failure="raise"))
    message = str(error.value)
    assert message == (
        f"round 1: client bad {reason}; fix the client, or set on-failure to skip to leave "
        "such clients out of the round"
    )
    assert "\n" not in message


def test_every_client_skipped_keeps_the_global_model():
    base, _updates_, nan, _ = _bad_replies()
    out = aggregate(base, [ClientUpdate("x", nan, 3)], AggregationSettings())
    _close(out, base, tol=0)


@pytest.mark.parametrize(
    ("method", "kwargs", "reason"),
    [
        (
            "fisher",
            {},
            "sent no fisher statistics, which the method reads; compute them on the client",
        ),
        (
            "regmean",
            {},
            "sent no gram statistics, which the method reads; compute them on the client",
        ),
        (
            "uncertainty",
            {},
            "reported no update variance, which the method reads; compute it on the client",
        ),
        (
            "fisher",
            {"fisher": {"fc.bias": torch.full((5,), float("nan"))}},
            "fisher of tensor 'fc.bias' has 5 NaN or inf values",
        ),
        (
            "fisher",
            {"fisher": {"fc.bias": -torch.ones(5)}},
            "fisher of tensor 'fc.bias' has negative entries",
        ),
        (
            "fisher",
            {"fisher": {"fc.bias": torch.ones(4)}},
            "fisher of tensor 'fc.bias' has shape [4], expected [5]",
        ),
        (
            "regmean",
            {"gram": {"fc.bias": torch.ones(5, 5)}},
            "sent a Gram matrix for tensor 'fc.bias' of shape [5]; Gram matrices belong to 2-D linear weights",
        ),
        (
            "regmean",
            {"gram": {"fc.weight": torch.ones(5, 5)}},
            "gram of tensor 'fc.weight' has shape [5, 5], expected [4, 4]",
        ),
        (
            "uncertainty",
            {"variance": -1.0},
            "reported an update variance of -1.0; expected a positive number",
        ),
    ],
)
def test_missing_or_bad_statistics_skip_the_client(method, kwargs, reason):
    base, updates = _updates(2)
    good_stats = {
        "fisher": {"fisher": {k: torch.ones(v.shape) for k, v in base.items()}},
        "regmean": {"gram": {"fc.weight": torch.eye(4)}},
        "uncertainty": {"variance": 1.0},
    }[method]
    good = ClientUpdate("good", updates[0].arrays, 5, **good_stats)
    bad = ClientUpdate("bad", updates[1].arrays, 5, **kwargs)
    prepared = prepare_round(base, [good, bad], settings(method=method))
    assert [(s.client, s.reason) for s in prepared.skipped] == [("bad", reason)]
    _close(dict(prepared.tensors()), dict(updates[0].arrays), tol=1e-6)


def test_statistics_for_other_tensors_than_the_other_clients():
    base, updates = _updates(3)
    full = {k: torch.ones(v.shape) for k, v in base.items()}
    partial = {"fc.weight": torch.ones(5, 4)}
    replies = [
        ClientUpdate("a", updates[0].arrays, 5, fisher=full),
        ClientUpdate("b", updates[1].arrays, 5, fisher=full),
        ClientUpdate("c", updates[2].arrays, 5, fisher=partial),
    ]
    prepared = prepare_round(base, replies, settings(method="fisher"))
    assert [(s.client, s.reason) for s in prepared.skipped] == [
        (
            "c",
            "sent fisher statistics for other tensors than the other clients (missing: 'fc.bias')",
        )
    ]


def test_unknown_method_and_bad_settings_are_one_line():
    with pytest.raises(ConfigError) as error:
        settings(method="fedprox")
    assert str(error.value) == (
        "aggregation settings: method: unknown aggregation 'fedprox'; valid: "
        + ", ".join(AGGREGATORS)
    )
    with pytest.raises(ConfigError) as error:
        settings({"server-momentum": 1.5, "desnity": 0.3})
    message = str(error.value)
    assert "server-momentum: Input should be less than 1 (got 1.5)" in message
    assert "desnity: unknown key (got 0.3)" in message
    assert "\n" not in message
    with pytest.raises(ConfigError) as error:
        settings(method="x" * 10_000)
    assert len(str(error.value)) < 300


def test_messages_name_keys_as_the_caller_wrote_them():
    with pytest.raises(ConfigError) as error:
        settings({"modelfuse-server-momentum": -0.5, "modelfuse-density": 0}, where="run config")
    assert str(error.value) == (
        "run config: modelfuse-server-momentum: Input should be greater than or equal to 0 "
        "(got -0.5); modelfuse-density: Input should be greater than 0 (got 0)"
    )


def test_run_config_keys_are_accepted():
    config = settings(
        {"modelfuse-method": "ties", "modelfuse-density": 0.25, "modelfuse-on-failure": "raise"}
    )
    assert (config.method, config.density, config.on_failure) == ("ties", 0.25, "raise")


def test_trajectory_variance_is_the_mean_unbiased_variance():
    snapshots = [
        {"w": torch.tensor([0.0, 1.0, 2.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([1.0, 1.0, 4.0]), "n": torch.tensor(4)},
        {"w": torch.tensor([2.0, 1.0, 0.0]), "n": torch.tensor(5)},
    ]
    per_entry = [np.var([0, 1, 2], ddof=1), 0.0, np.var([2, 4, 0], ddof=1)]
    assert trajectory_variance(snapshots) == pytest.approx(sum(per_entry) / 3)
    with pytest.raises(ConfigError, match="at least two snapshots"):
        trajectory_variance(snapshots[:1])
    with pytest.raises(ConfigError, match="snapshot 1 has no tensor 'w'"):
        trajectory_variance([snapshots[0], {"n": torch.tensor(1)}])


def test_every_method_is_registered_and_runs():
    base, updates = _updates()
    needs = {
        "fisher": {"fisher": {k: torch.ones(v.shape) for k, v in base.items()}},
        "regmean": {"gram": {"fc.weight": torch.eye(4)}},
        "uncertainty": {"variance": 1.0},
    }
    for method in AGGREGATORS:
        replies = [
            ClientUpdate(u.client, u.arrays, u.num_examples, **needs.get(method, {}))
            for u in updates
        ]
        out = aggregate(base, replies, settings(method=method))
        assert out.keys() == base.keys()
        assert all(math.isfinite(float(v.abs().sum())) for v in out.values())
