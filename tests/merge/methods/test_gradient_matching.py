import copy

import pytest
import torch

from modelfuse.errors import ConfigError, DataError
from modelfuse.merge import gradient_matching, merge_state_dicts


def _setup(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(5, generator=g)}
    models = [
        {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)
    ]
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models, fishers


def test_without_the_fine_tuning_prior_matches_the_scalar_prior_formula():
    base, models, fishers = _setup()
    alpha, delta = [1.0, 0.5, 2.0], 0.7
    merged = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=fishers,
        weights=alpha,
        prior_precision=delta,
        fine_tuning_prior=False,
    )
    for name in base:
        # theta = theta_b + (sum_i a_i H_i + H_0)^-1 sum_i a_i H_i tau_i, H_0 = delta,
        # H_i = max(F_i, 1e-6), all entry-wise
        h = [alpha[i] * torch.clamp(fishers[i][name], min=1e-6) for i in range(3)]
        tau = [models[i][name] - base[name] for i in range(3)]
        expected = base[name] + sum(h[i] * tau[i] for i in range(3)) / (sum(h) + delta)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_zero_prior_is_fisher_averaging():
    base, models, fishers = _setup(seed=1)
    merged = merge_state_dicts("gradient_matching", models, base, fishers=fishers)
    fisher_merged = merge_state_dicts("fisher", models, fishers=fishers)
    for name in base:
        torch.testing.assert_close(merged[name], fisher_merged[name], rtol=1e-5, atol=1e-5)


def test_constant_precisions_give_task_arithmetic():
    base, models, _ = _setup(seed=2)
    h, lam, n = 0.25, 0.2, 3
    constant = [{k: torch.full(v.shape, h) for k, v in base.items()} for _ in range(n)]
    # H_i = h, H_0 = h (1/lam - n), task vectors weighted by H_i  =>  theta_b + lam * sum_i tau_i
    merged = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=constant,
        prior_precision=h * (1 / lam - n),
        fine_tuning_prior=False,
    )
    for name in base:
        expected = base[name] + lam * sum(m[name] - base[name] for m in models)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_needs_a_base_and_valid_statistics():
    base, models, fishers = _setup()
    with pytest.raises(ConfigError, match="base"):
        merge_state_dicts("gradient_matching", models, fishers=fishers)
    with pytest.raises(ConfigError, match="base"):
        gradient_matching([models[0]["w"]], None, statistics={"fisher": [fishers[0]["w"]]})
    with pytest.raises(ConfigError, match="not all zero"):
        merge_state_dicts("gradient_matching", models, base, fishers=fishers, weights=[0, 0, 0])
    bad = [fishers[0], fishers[1], {**fishers[2], "w": -fishers[2]["w"]}]
    with pytest.raises(ConfigError, match="negative"):
        merge_state_dicts("gradient_matching", models, base, fishers=bad)


def test_tensors_larger_than_one_block_follow_the_formula():
    g = torch.Generator().manual_seed(9)
    shape = (1030, 1024)  # more entries than one block of 2**20
    base = torch.randn(shape, generator=g)
    tensors = [base + torch.randn(shape, generator=g) for _ in range(2)]
    fishers = [torch.rand(shape, generator=g) for _ in range(2)]
    f0 = torch.rand(shape, generator=g)
    result = gradient_matching(
        tensors,
        base,
        statistics={"fisher": fishers, "base_fisher": [f0]},
        prior_precision=0.5,
        dataset_size=[3.0, 5.0],
        base_dataset_size=2.0,
    )
    h = [3.0 * torch.clamp(fishers[0], min=1e-6), 5.0 * torch.clamp(fishers[1], min=1e-6)]
    h0 = 2.0 * f0 + 0.5
    expected = base + ((h0 + h[0]) * (tensors[0] - base) + (h0 + h[1]) * (tensors[1] - base)) / (
        h0 + h[0] + h[1]
    )
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_row_blocks_give_the_same_result(monkeypatch):
    """gradient_matching is elementwise, so the engine may merge it in blocks of rows."""
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 5, generator=g)}
    models = [{"w": torch.randn(6, 5, generator=g)} for _ in range(2)]
    fishers = [{"w": torch.rand(6, 5, generator=g)} for _ in range(2)]
    whole = merge_state_dicts("gradient_matching", models, base, fishers=fishers)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 10)
    blocks = merge_state_dicts("gradient_matching", models, base, fishers=fishers, threads=2)
    torch.testing.assert_close(blocks["w"], whole["w"], rtol=0, atol=0)


def test_paper_estimator_with_base_fisher_and_dataset_sizes_matches_the_formula():
    base, models, fishers = _setup(seed=4)
    g = torch.Generator().manual_seed(40)
    f0 = {k: torch.rand(v.shape, generator=g) for k, v in base.items()}
    alpha, sizes, n0, delta = [1.0, 0.5, 2.0], [100.0, 20.0, 7.0], 50.0, 0.3
    merged = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=fishers,
        base_fisher=f0,
        model_parameters=[{"dataset_size": s} for s in sizes],
        weights=alpha,
        base_dataset_size=n0,
        prior_precision=delta,
    )
    for name in base:
        theta0 = base[name].double().flatten()
        out = merged[name].double().flatten()
        for j in range(theta0.numel()):
            # Daheim et al. (2024): theta_0 + Hbar^-1 sum_t alpha_t (H_0 + H_t) tau_t,
            # Hbar = H_0 + sum_t alpha_t H_t, H_t = N_t F_t, H_0 = N_0 F_0 + delta
            h0 = n0 * float(f0[name].flatten()[j]) + delta
            ht = [sizes[t] * max(float(fishers[t][name].flatten()[j]), 1e-6) for t in range(3)]
            tau = [float(models[t][name].flatten()[j]) - float(theta0[j]) for t in range(3)]
            hbar = h0 + sum(alpha[t] * ht[t] for t in range(3))
            expected = (
                float(theta0[j]) + sum(alpha[t] * (h0 + ht[t]) * tau[t] for t in range(3)) / hbar
            )
            assert float(out[j]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_quadratic_losses_recover_the_multitask_solution():
    """For quadratic task losses the estimator is exact: fine-tune each task under the prior
    H_0, merge, and compare with the minimiser of sum_t alpha_t l_t + prior, in closed form."""
    g = torch.Generator().manual_seed(5)
    d, n = 7, 3
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    f0 = torch.rand(d, generator=g, dtype=torch.float64)
    n0, delta = 4.0, 0.5
    h0 = n0 * f0 + delta
    sizes = [10.0, 3.0, 25.0]
    alpha = [0.7, 1.0, 0.4]
    f = [torch.rand(d, generator=g, dtype=torch.float64) + 0.1 for _ in range(n)]
    optima = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    h = [s * fi for s, fi in zip(sizes, f)]
    # l_t(theta) = 1/2 (theta - m_t)' H_t (theta - m_t); fine-tuning minimises l_t + prior:
    finetuned = [(ht * m + h0 * theta0) / (ht + h0) for ht, m in zip(h, optima)]
    target = (h0 * theta0 + sum(a * ht * m for a, ht, m in zip(alpha, h, optima))) / (
        h0 + sum(a * ht for a, ht in zip(alpha, h))
    )
    merged = gradient_matching(
        [t.float() for t in finetuned],
        theta0.float(),
        statistics={"fisher": [fi.float() for fi in f], "base_fisher": [f0.float()]},
        weight=alpha,
        dataset_size=sizes,
        base_dataset_size=n0,
        prior_precision=delta,
        fisher_floor=0.0,
    )
    torch.testing.assert_close(merged.double(), target, rtol=1e-5, atol=1e-5)


def test_vanishing_task_precisions_give_task_arithmetic():
    # the paper's limit: H_t -> 0 next to H_0 turns the merge into theta_0 + sum_t alpha_t tau_t
    base, models, fishers = _setup(seed=6)
    alpha = [0.3, 1.0, 0.5]
    merged = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=fishers,
        weights=alpha,
        model_parameters=[{"dataset_size": 0.0}] * 3,
        prior_precision=1.0,
    )
    arithmetic = merge_state_dicts("task_arithmetic", models, base, weights=alpha)
    for name in base:
        expected = base[name] + sum(a * (m[name] - base[name]) for a, m in zip(alpha, models))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[name], arithmetic[name], rtol=1e-5, atol=1e-6)


def test_equal_isotropic_fishers_give_the_weighted_task_vector_average():
    base, models, _ = _setup(seed=7)
    alpha = [0.2, 0.5, 0.3]  # summing to 1
    iso = [{k: torch.full(v.shape, 0.8) for k, v in base.items()} for _ in range(3)]
    f0 = {k: torch.full(v.shape, 0.4) for k, v in base.items()}
    merged = merge_state_dicts(
        "gradient_matching", models, base, fishers=iso, base_fisher=f0, weights=alpha
    )
    for name in base:
        # (h0 + h) sum_t alpha_t tau_t / (h0 + h), with sum_t alpha_t = 1
        expected = base[name] + sum(a * (m[name] - base[name]) for a, m in zip(alpha, models))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_a_constant_base_fisher_is_the_scalar_prior():
    base, models, fishers = _setup(seed=8)
    c, n0 = 0.6, 2.5
    constant = {k: torch.full(v.shape, c) for k, v in base.items()}
    with_file = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=fishers,
        base_fisher=constant,
        base_dataset_size=n0,
    )
    scalar = merge_state_dicts(
        "gradient_matching", models, base, fishers=fishers, prior_precision=c * n0
    )
    for name in base:
        torch.testing.assert_close(with_file[name], scalar[name], rtol=1e-6, atol=1e-6)


def test_the_scalar_prior_without_the_fine_tuning_prior_is_the_earlier_estimator():
    # the estimator modelfuse had before the base Fisher: theta_0 + (delta + sum H)^-1 sum H tau
    base = torch.tensor([0.0, 0.0])
    a, b = torch.tensor([2.0, 2.0]), torch.tensor([4.0, 0.0])
    h = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0])]
    earlier = gradient_matching(
        [a, b], base, statistics={"fisher": h}, prior_precision=2.0, fine_tuning_prior=False
    )
    # by hand: (1*2 + 1*4) / (2 + 1 + 1) = 1.5 and (1*2 + 3*0) / (2 + 1 + 3) = 1/3
    torch.testing.assert_close(earlier, torch.tensor([1.5, 1.0 / 3.0]))
    # both estimators agree without a prior (Fisher averaging)
    paper = gradient_matching([a, b], base, statistics={"fisher": h})
    torch.testing.assert_close(
        paper, gradient_matching([a, b], base, statistics={"fisher": h}, fine_tuning_prior=False)
    )


def test_base_fisher_problems_name_the_tensor_and_the_source():
    base, models, fishers = _setup(seed=9)
    f0 = {k: torch.rand(v.shape) for k, v in base.items()}
    with pytest.raises(ConfigError, match="pass base= and fishers="):
        merge_state_dicts("gradient_matching", models, base, base_fisher=f0)
    with pytest.raises(ConfigError, match="'fisher' does not read the base model's Fisher"):
        merge_state_dicts("fisher", models, base, fishers=fishers, base_fisher=f0)
    wrong = {**f0, "w": torch.rand(4, 5)}
    with pytest.raises(ConfigError, match=r"base_fisher: statistics tensor w has shape \[4, 5\]"):
        merge_state_dicts("gradient_matching", models, base, fishers=fishers, base_fisher=wrong)
    missing = {"b": f0["b"]}
    with pytest.raises(
        DataError, match="base_fisher: the base model's statistics have no tensor w"
    ):
        merge_state_dicts("gradient_matching", models, base, fishers=fishers, base_fisher=missing)
    negative = {**f0, "b": -f0["b"] - 0.1}
    with pytest.raises(ConfigError, match="base_fisher: statistics tensor b holds negative"):
        merge_state_dicts("gradient_matching", models, base, fishers=fishers, base_fisher=negative)
    with pytest.raises(ConfigError, match="tensor b: the base model's Fisher has negative"):
        gradient_matching(
            [models[0]["b"]],
            base["b"],
            statistics={"fisher": [fishers[0]["b"]], "base_fisher": [negative["b"]]},
            name="b",
        )
    bad_model = [fishers[0], {**fishers[1], "w": torch.rand(2, 2)}, fishers[2]]
    with pytest.raises(ConfigError, match=r"statistics 1: statistics tensor w has shape \[2, 2\]"):
        merge_state_dicts("gradient_matching", models, base, fishers=bad_model)
    with pytest.raises(ConfigError, match="2 values of dataset_size for 1 models"):
        gradient_matching(
            [models[0]["b"]],
            base["b"],
            statistics={"fisher": [fishers[0]["b"]]},
            dataset_size=[1.0, 2.0],
        )


def _files(tmp_path):
    from safetensors.torch import load_file, save_file

    from modelfuse.statistics.storage import save as save_statistics

    base, models, fishers = _setup(seed=10)
    g = torch.Generator().manual_seed(11)
    f0 = {k: torch.rand(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    entries = []
    for i, (m, f) in enumerate(zip(models, fishers)):
        save_file(m, tmp_path / f"m{i}.safetensors")
        save_statistics(f, tmp_path / f"m{i}.fisher.safetensors", kind="fisher", n_examples=4)
        entries.append(
            {
                "model": str(tmp_path / f"m{i}.safetensors"),
                "statistics": str(tmp_path / f"m{i}.fisher.safetensors"),
                "parameters": {"dataset_size": 10.0 * (i + 1)},
            }
        )
    save_statistics(f0, tmp_path / "base.fisher.safetensors", kind="fisher", n_examples=4)
    config = {
        "merge_method": "gradient_matching",
        "base_model": str(tmp_path / "base.safetensors"),
        "base_statistics": str(tmp_path / "base.fisher.safetensors"),
        "models": entries,
        "parameters": {"base_dataset_size": 30.0, "prior_precision": 0.1},
    }
    return config, (base, models, fishers, f0), load_file


def test_configuration_base_statistics_give_the_in_memory_result(tmp_path):
    import modelfuse

    config, (base, models, fishers, f0), load_file = _files(tmp_path)
    modelfuse.merge(config, tmp_path / "out", threads=1)
    merged = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(file))
    expected = merge_state_dicts(
        "gradient_matching",
        models,
        base,
        fishers=fishers,
        base_fisher=f0,
        model_parameters=[{"dataset_size": 10.0 * (i + 1)} for i in range(3)],
        base_dataset_size=30.0,
        prior_precision=0.1,
    )
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)
    written = (tmp_path / "out" / "modelfuse.yaml").read_text()
    assert f"base_statistics: {tmp_path / 'base.fisher.safetensors'}" in written


def test_configuration_base_statistics_problems_name_the_key_and_file(tmp_path):
    from safetensors.torch import save_file

    import modelfuse

    config, (base, *_), _ = _files(tmp_path)
    linear = copy.deepcopy({**config, "merge_method": "linear"})
    for entry in linear["models"]:
        entry.pop("statistics")
        entry.pop("parameters")
    linear.pop("parameters")
    with pytest.raises(ConfigError, match="base_statistics: merge method 'linear' does not read"):
        modelfuse.merge(linear, tmp_path / "out1")
    save_file({"b": torch.rand(5)}, tmp_path / "partial.safetensors")
    partial = {**config, "base_statistics": str(tmp_path / "partial.safetensors")}
    with pytest.raises(
        DataError, match="partial.safetensors: the base model's statistics have no tensor w"
    ):
        modelfuse.merge(partial, tmp_path / "out2", threads=1)
    assert not (tmp_path / "out2").exists()
    save_file({"w": torch.rand(4, 5), "b": torch.rand(5)}, tmp_path / "wrong.safetensors")
    wrong = {**config, "base_statistics": str(tmp_path / "wrong.safetensors")}
    with pytest.raises(
        ConfigError, match=r"wrong.safetensors: statistics tensor w has shape \[4, 5\]"
    ):
        modelfuse.merge(wrong, tmp_path / "out3", threads=1)
    no_base = {k: v for k, v in config.items() if k != "base_model"}
    with pytest.raises(ConfigError, match="base_statistics: there is no base_model"):
        modelfuse.merge(no_base, tmp_path / "out4")


def test_command_line_refuses_a_base_fisher_missing_a_tensor(tmp_path, capsys):
    import yaml

    from modelfuse.cli import main

    config, _, _ = _files(tmp_path)
    from safetensors.torch import save_file

    save_file({"b": torch.rand(5)}, tmp_path / "partial.safetensors")
    config["base_statistics"] = str(tmp_path / "partial.safetensors")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    before = {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    code = main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error:")
    assert "partial.safetensors: the base model's statistics have no tensor w" in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before
