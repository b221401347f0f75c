import pytest
import torch
import yaml
from safetensors.torch import save_file

from modelfuse.errors import ConfigError
from modelfuse.merge import fisher, merge, merge_state_dicts


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": torch.randn(4, 3, generator=g),
            "layer.bias": torch.randn(4, generator=g),
            "norm.running_mean": torch.randn(4, generator=g),
        }
        for _ in range(n)
    ]


def _fishers(n, seed=1, zero_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        fw = torch.rand(4, 3, generator=g)
        fb = torch.rand(4, generator=g)
        if zero_fraction:
            fw[torch.rand(4, 3, generator=g) < zero_fraction] = 0.0
        out.append({"layer.weight": fw, "layer.bias": fb})
    return out


def test_equal_fishers_give_the_plain_average():
    states = _states(3)
    shared = _fishers(1)[0]
    merged = merge_state_dicts("fisher", states, fishers=[shared, shared, shared])
    for name in states[0]:
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_weighted_fisher_average_matches_formula_with_floor():
    states = _states(3, seed=2)
    fishers = _fishers(3, seed=3, zero_fraction=0.5)
    lam = [0.5, 2.0, 1.0]
    merged = merge_state_dicts("fisher", states, fishers=fishers, weights=lam)
    for name in ("layer.weight", "layer.bias"):
        # theta = sum_i lam_i max(F_i, 1e-6) theta_i / sum_i lam_i max(F_i, 1e-6)
        ft = [torch.clamp(f[name], min=1e-6) for f in fishers]
        num = sum(lam[i] * ft[i] * states[i][name] for i in range(3))
        den = sum(lam[i] * ft[i] for i in range(3))
        torch.testing.assert_close(merged[name], num / den, rtol=1e-5, atol=1e-6)
    # a buffer without a Fisher is the lambda-weighted average
    expected = sum(lam[i] * states[i]["norm.running_mean"] for i in range(3)) / sum(lam)
    torch.testing.assert_close(merged["norm.running_mean"], expected, rtol=1e-5, atol=1e-6)


def test_entries_where_every_fisher_vanishes():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])
    fa, fb = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 3.0, 2.0])
    stats = {"fisher": [fa, fb]}
    # default: both floored -> where both vanish, the average
    plain = fisher([a, b], statistics=stats)
    torch.testing.assert_close(plain[0], torch.tensor(3.0))
    # favor_first: only the first is floored -> the first model's value there;
    # entry 1 = (1*2 + 3*6) / (1 + 3); entry 2 = (1e-6*3 + 2*7) / (1e-6 + 2)
    favored = fisher([a, b], statistics=stats, favor_first=True)
    expected2 = (1e-6 * 3.0 + 2.0 * 7.0) / (1e-6 + 2.0)
    torch.testing.assert_close(favored, torch.tensor([1.0, 5.0, expected2]), rtol=1e-6, atol=1e-6)
    # floor 0 without favouring: the vanished entry falls back to the average
    zero_floor = fisher([a, b], statistics=stats, fisher_floor=0.0)
    torch.testing.assert_close(zero_floor, torch.tensor([3.0, 5.0, 7.0]))


def test_tensor_normalisation_divides_each_coefficient_by_the_fisher_norm():
    states = _states(2, seed=4)
    fishers = _fishers(2, seed=5)
    fishers[1] = {k: v * 1000.0 for k, v in fishers[1].items()}  # a model with a larger scale
    merged = merge_state_dicts("fisher", states, fishers=fishers, normalize="tensor")
    name = "layer.weight"
    coef = [1.0 / float(torch.linalg.vector_norm(f[name])) for f in fishers]
    ft = [torch.clamp(f[name], min=1e-6) for f in fishers]
    expected = sum(coef[i] * ft[i] * states[i][name] for i in range(2)) / sum(
        coef[i] * ft[i] for i in range(2)
    )
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_bad_statistics_are_reported():
    states = _states(2)
    fishers = _fishers(2)
    partial = [fishers[0], {"layer.weight": fishers[1]["layer.weight"]}]
    with pytest.raises(ConfigError, match="layer.bias"):
        merge_state_dicts("fisher", states, fishers=partial)
    wrong = [fishers[0], {**fishers[1], "layer.bias": torch.ones(5)}]
    with pytest.raises(ConfigError, match=r"shape \[5\], expected \[4\]"):
        merge_state_dicts("fisher", states, fishers=wrong)
    negative = [fishers[0], {**fishers[1], "layer.bias": -torch.ones(4)}]
    with pytest.raises(ConfigError, match="negative"):
        merge_state_dicts("fisher", states, fishers=negative)
    with pytest.raises(ConfigError, match="statistics"):
        merge_state_dicts("fisher", states)
    with pytest.raises(ConfigError, match="weight"):
        merge_state_dicts("fisher", states, fishers=fishers, weights=[1.0, 0.0])


def test_yaml_merge_reads_statistics_files(tmp_path):
    states = _states(2, seed=6)
    fishers = _fishers(2, seed=7)
    models = []
    for i in range(2):
        save_file(states[i], str(tmp_path / f"m{i}.safetensors"))
        save_file(fishers[i], str(tmp_path / f"f{i}.safetensors"))
        models.append({"model": f"m{i}.safetensors", "statistics": f"f{i}.safetensors"})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "fisher", "models": models}))
    result = merge(config, tmp_path / "out", threads=1)
    from safetensors.torch import load_file

    merged = load_file(str(result.out / "model.safetensors"))
    expected = merge_state_dicts("fisher", states, fishers=fishers)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])


def test_tensors_larger_than_one_block_follow_the_formula():
    g = torch.Generator().manual_seed(8)
    shape = (1030, 1024)  # more entries than one block of 2**20
    tensors = [torch.randn(shape, generator=g) for _ in range(2)]
    fishers = [torch.rand(shape, generator=g) for _ in range(2)]
    fishers[0][-3:] = 0.0
    fishers[1][-3:] = 0.0  # rows where every Fisher vanishes, in the last block
    result = fisher(tensors, statistics={"fisher": fishers}, weight=[1.0, 3.0], fisher_floor=0.0)
    den = fishers[0] + 3.0 * fishers[1]
    expected = (fishers[0] * tensors[0] + 3.0 * fishers[1] * tensors[1]) / den
    expected[-3:] = (tensors[0][-3:] + 3.0 * tensors[1][-3:]) / 4.0  # the weighted average there
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_model_normalisation_divides_by_the_whole_model_fisher_norm():
    states = _states(2, seed=8)
    fishers = _fishers(2, seed=9)
    weights = [1.0, 2.0]
    norms = [
        float(torch.sqrt(sum((f[k] ** 2).sum() for k in f))) for f in fishers
    ]  # over every tensor of the model, not one
    out = merge_state_dicts(
        "fisher", states, fishers=fishers, weights=weights, normalize="model"
    )
    for name in ("layer.weight", "layer.bias"):
        c = [w / n for w, n in zip(weights, norms)]
        f = [fi[name].clamp_min(1e-6) for fi in fishers]
        expected = (c[0] * f[0] * states[0][name] + c[1] * f[1] * states[1][name]) / (
            c[0] * f[0] + c[1] * f[1]
        )
        torch.testing.assert_close(out[name], expected)


def test_model_normalisation_needs_the_norms():
    states, fishers = _states(2), _fishers(2)
    with pytest.raises(ConfigError, match="fisher_norms"):
        fisher(
            [states[0]["layer.bias"], states[1]["layer.bias"]],
            statistics={"fisher": [fishers[0]["layer.bias"], fishers[1]["layer.bias"]]},
            normalize="model",
        )


def test_row_blocks_read_statistics_rows_and_match(tmp_path, monkeypatch):
    """Large tensors are merged in blocks of rows, their Fisher rows read alongside."""
    import modelfuse.merge.schedule as schedule

    states = _states(2, seed=10)
    fishers = _fishers(2, seed=11)
    models = []
    for i in range(2):
        save_file(states[i], str(tmp_path / f"m{i}.safetensors"))
        save_file(fishers[i], str(tmp_path / f"f{i}.safetensors"))
        models.append({"model": f"m{i}.safetensors", "statistics": f"f{i}.safetensors"})
    config = {"merge_method": "fisher", "models": models, "parameters": {"normalize": "model"}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 3)  # 4 x 3 weight -> four blocks of one row
    from modelfuse.merge.engine import plan_merge

    plan = plan_merge(path)
    task = next(t for t in plan.tasks if t.name == "layer.weight")
    assert schedule.row_blocks(plan, task) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    result = merge(path, tmp_path / "out", threads=2)
    from safetensors.torch import load_file

    merged = load_file(str(result.out / "model.safetensors"))
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 1 << 22)
    expected = merge_state_dicts("fisher", states, fishers=fishers, normalize="model")
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])
