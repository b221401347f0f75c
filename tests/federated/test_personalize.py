"""Personalize: local, global, interpolated and FedLabel-selected models per client."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.errors import DataError
from modelfuse.evaluation import holm, paired_bootstrap
from modelfuse.federated.personalize import ClientSplit, Personalizer, fedlabel_select


def _client(name: str, feature: int, local: dict, seed: int, n: int = 120) -> ClientSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, feature] > 0).long()
    half = n // 2
    return ClientSplit(name, local, x[:half], y[:half], x[half:], y[half:])


def _state(w: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor(w), "bias": torch.zeros(2)}


ON_X0 = _state([[-4.0, 0.0], [4.0, 0.0]])
ON_X1 = _state([[0.0, -4.0], [0.0, 4.0]])


def _fit(**kw):
    net = nn.Linear(2, 2)
    # client "a": labels follow x0, its local model reads x0, the global reads x1
    # client "b": labels follow x1, its local model reads x0 (wrong), the global is right
    clients = [_client("a", 0, ON_X0, 1), _client("b", 1, ON_X0, 2)]
    return net, clients, Personalizer(net, n_resamples=300, **kw).fit(clients, ON_X1)


def test_local_wins_for_one_client_and_global_for_the_other():
    net, clients, r = _fit()
    by = {c.name: c for c in r.clients}
    assert by["a"].scores["local"]["accuracy"] > 0.95 > 0.75 > by["a"].scores["global"]["accuracy"]
    assert by["b"].scores["global"]["accuracy"] > 0.95 > 0.75 > by["b"].scores["local"]["accuracy"]
    assert r.gains == ["b"] and r.losses == ["a"]
    assert by["a"].alpha > 0.5 > by["b"].alpha
    assert "1 of 2 clients gain" in r.summary() and "1 lose" in r.summary()


def _nll_reference(state, x, y) -> float:
    logits = x @ state["weight"].T + state["bias"]
    logp = torch.log_softmax(logits.double(), dim=1)
    return float(-logp[torch.arange(len(y)), y].mean())


def test_alpha_equals_a_brute_force_grid_search():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, 2, generator=g)
    y = ((x[:, 0] + 0.7 * x[:, 1] + 0.5 * torch.randn(80, generator=g)) > 0).long()
    client = ClientSplit("c", ON_X0, x[:40], y[:40], x[40:], y[40:])
    r = Personalizer(nn.Linear(2, 2), alphas=21, n_resamples=50).fit([client], ON_X1)
    best_alpha, best = None, None
    for a in np.linspace(0, 1, 21):
        st = {k: (1 - a) * ON_X1[k] + a * ON_X0[k] for k in ON_X0}
        s = -_nll_reference(st, x[:40], y[:40])
        if best is None or s > best + 1e-12:
            best_alpha, best = a, s
    assert r.clients[0].alpha == pytest.approx(best_alpha)
    assert 0.0 < r.clients[0].alpha < 1.0


def test_fedlabel_selection_is_the_rule_written_out():
    rng = np.random.default_rng(0)
    local = rng.dirichlet(np.ones(4), size=50)
    glob = rng.dirichlet(np.ones(4), size=50)
    expected = np.empty_like(local)
    for i in range(50):
        expected[i] = local[i] if local[i].max() >= glob[i].max() else glob[i]
    np.testing.assert_array_equal(fedlabel_select(local, glob), expected)
    with pytest.raises(DataError, match="differ in shape"):
        fedlabel_select(local, glob[:3])


def test_intervals_and_holm_equal_the_statistics_functions_called_directly():
    net, clients, r = _fit()
    pvalues, keys = [], []
    for client, comp in zip(clients, r.clients, strict=True):
        with torch.no_grad():
            p_local = torch.softmax((client.x_test @ ON_X0["weight"].T).double(), 1).numpy()
            p_global = torch.softmax((client.x_test @ ON_X1["weight"].T).double(), 1).numpy()
        y = client.y_test.numpy()
        direct = paired_bootstrap(
            p_global, p_local, y, metric="nll", method="percentile", n_resamples=300, random_state=0
        )
        got = comp.differences["global"]["nll"]
        assert got.statistic == pytest.approx(direct.statistic)
        assert got.ci == pytest.approx(direct.ci)
        assert got.pvalue == pytest.approx(direct.pvalue)
        for k in ("global", "interpolated", "selected"):
            pvalues.append(comp.differences[k]["nll"].pvalue)
            keys.append((comp, k))
    for (comp, k), p in zip(keys, holm(pvalues), strict=True):
        assert comp.adjusted_pvalues[k]["nll"] == pytest.approx(p)


def test_calibration_table_plot_and_no_side_effects(tmp_path):
    net = nn.Linear(2, 2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    clients = [_client("a", 0, ON_X0, 1)]
    x_before = clients[0].x_val.clone()
    r = Personalizer(net, n_resamples=100, calibrate="temperature").fit(clients, ON_X1)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(clients[0].x_val, x_before)
    table = r.table(metric="ece")
    assert table.splitlines()[0].startswith("| client") and len(table.splitlines()) == 3
    assert r.plot(tmp_path / "p.png").stat().st_size > 0


def test_bad_labels_are_refused():
    x = torch.randn(10, 2)
    bad = ClientSplit("a", ON_X0, x, torch.full((10,), 5), x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(DataError, match=r"y_val: labels must lie in \[0, 2\)"):
        Personalizer(nn.Linear(2, 2), n_resamples=20).fit([bad], ON_X1)


@pytest.mark.parametrize(
    ("local", "y_val", "match"),
    [
        (
            {"weight": torch.zeros(2, 2)},
            None,
            r"local_state: tensor names differ .*missing \['bias'\]",
        ),
        (
            {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)},
            None,
            r"'weight' has shape \[3, 2\]",
        ),
        (ON_X0, torch.zeros(10), "integer class labels, got shape .* of dtype float32"),
        (ON_X0, torch.zeros(4, dtype=torch.long), "x_val/y_val: .* got 10 inputs and 4 labels"),
    ],
)
def test_mismatched_clients_are_refused_with_the_client_named(local, y_val, match):
    x = torch.randn(10, 2)
    y = torch.zeros(10, dtype=torch.long)
    bad = ClientSplit("a", local, x, y if y_val is None else y_val, x, y)
    with pytest.raises(DataError, match=match) as info:
        Personalizer(nn.Linear(2, 2), n_resamples=20).fit([bad], ON_X1)
    assert str(info.value).startswith("client 'a'")
