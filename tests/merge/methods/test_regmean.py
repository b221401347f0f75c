import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.merge import RegMeanJitterWarning, merge, merge_state_dicts, regmean
from modelfuse.statistics import gram_matrices, save


def _layers(n, d_in=5, d_out=3, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(d_in, d_out) for _ in range(n)]


def test_alpha_one_equals_least_squares_on_concatenated_inputs_and_outputs():
    layers = _layers(3)
    rng = np.random.default_rng(0)
    # each model sees its own data (different scales and correlations), 40 examples each
    xs = [
        torch.tensor(rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)), dtype=torch.float32)
        for _ in layers
    ]
    grams = [gram_matrices(layer, [x]) for layer, x in zip(layers, xs)]
    merged = merge_state_dicts(
        "regmean", [layer.state_dict() for layer in layers], grams=grams, alpha=1.0
    )
    # defining property: W* minimises sum_i ||X_i W^T - X_i W_i^T||^2, i.e. the least-squares
    # fit of the models' (bias-free) outputs on the concatenated inputs
    X = np.concatenate([x.double().numpy() for x in xs])
    Y = np.concatenate(
        [
            x.double().numpy() @ layer.weight.detach().double().numpy().T
            for x, layer in zip(xs, layers)
        ]
    )
    w_t, *_ = np.linalg.lstsq(X, Y, rcond=None)
    np.testing.assert_allclose(merged["weight"].numpy(), w_t.T, rtol=1e-4, atol=1e-5)
    # the bias has no Gram matrix: plain average
    expected_bias = torch.stack([layer.bias.detach() for layer in layers]).mean(0)
    torch.testing.assert_close(merged["bias"], expected_bias)


def test_alpha_scales_off_diagonal_entries():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(2, 4, generator=g) for _ in range(2)]
    grams = []
    for _ in range(2):
        a = torch.randn(10, 4, generator=g)
        grams.append(a.T @ a / 10)
    alpha = 0.3
    result = regmean(ws, statistics={"gram": grams}, alpha=alpha)
    # G~ = alpha G + (1 - alpha) diag(G);  W*^T = (sum G~)^-1 sum G~ W_i^T
    tilde = [alpha * G.double() + (1 - alpha) * torch.diag(torch.diag(G.double())) for G in grams]
    lhs = (tilde[0] + tilde[1]).numpy()
    rhs = (tilde[0] @ ws[0].double().T + tilde[1] @ ws[1].double().T).numpy()
    np.testing.assert_allclose(result.numpy(), np.linalg.solve(lhs, rhs).T, rtol=1e-5, atol=1e-6)
    # alpha = 0: per-input-feature weighted average with the diagonal as weights
    diag = regmean(ws, statistics={"gram": grams}, alpha=0.0)
    d = [torch.diag(G) for G in grams]
    torch.testing.assert_close(
        diag, (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]), rtol=1e-5, atol=1e-6
    )


def test_singular_gram_is_solved_with_a_reported_jitter():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(3, 4, generator=g) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(20, 4, generator=g)
        x[:, 2] = 0.0  # a dead input feature: every Gram matrix is singular
        grams.append(x.T @ x / 20)
    with pytest.warns(RegMeanJitterWarning, match=r"tensor fc\.weight.*jitter [0-9.e+-]+"):
        result = regmean(ws, statistics={"gram": grams}, alpha=1.0, name="fc.weight")
    assert bool(torch.isfinite(result).all())
    # the column no input reaches takes the plain average
    torch.testing.assert_close(result[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, rtol=1e-4, atol=1e-5)
    # the other columns still fit the data: compare with least squares on the live features
    live = [0, 1, 3]
    lhs = sum(G[live][:, live].double() for G in grams)
    rhs = sum(G[live].double() @ w.double().T for G, w in zip(grams, ws))
    np.testing.assert_allclose(
        result[:, live].numpy(), np.linalg.solve(lhs, rhs).T, rtol=1e-3, atol=1e-4
    )


def test_bad_gram_matrices_are_reported():
    ws = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ConfigError, match=r"shape \[3, 3\], expected \[4, 4\]"):
        regmean(ws, statistics={"gram": [torch.eye(4), torch.eye(3)]}, name="fc.weight")
    with pytest.raises(ConfigError, match="model\\(s\\) 1"):
        regmean(ws, statistics={"gram": [torch.eye(4), None]}, name="fc.weight")
    with pytest.raises(ConfigError, match="2-D"):
        regmean([torch.randn(4), torch.randn(4)], statistics={"gram": [torch.eye(4)] * 2})
    with pytest.raises(ConfigError, match="alpha"):
        merge_state_dicts(
            "regmean", [{"w": ws[0]}, {"w": ws[1]}], grams=[{"w": torch.eye(4)}] * 2, alpha=1.5
        )


def test_yaml_merge_reads_gram_files(tmp_path):

    torch.manual_seed(3)
    models = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2)]
    entries, states, grams = [], [], []
    for i, model in enumerate(models):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gram = gram_matrices(model, [torch.randn(30, 4)])
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
        save(gram, tmp_path / f"g{i}.safetensors")
        entries.append({"model": f"m{i}.safetensors", "statistics": f"g{i}.safetensors"})
        states.append(state)
        grams.append(gram)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump({"merge_method": "regmean", "models": entries, "parameters": {"alpha": 0.5}})
    )
    result = merge(config, tmp_path / "out", threads=1)
    merged = load_file(str(result.out / "model.safetensors"))
    expected = merge_state_dicts("regmean", states, grams=grams, alpha=0.5)
    assert set(merged) == set(expected)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])
