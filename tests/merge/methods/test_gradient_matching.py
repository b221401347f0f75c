import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import gradient_matching, merge_state_dicts


def _setup(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(5, generator=g)}
    models = [
        {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)
    ]
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models, fishers


def test_matches_formula_with_prior_precision_and_weights():
    base, models, fishers = _setup()
    alpha, delta = [1.0, 0.5, 2.0], 0.7
    merged = merge_state_dicts(
        "gradient_matching", models, base, fishers=fishers, weights=alpha, prior_precision=delta
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
    # H_i = h, H_0 = h (1/lam - n)  =>  theta_b + lam * sum_i tau_i
    merged = merge_state_dicts(
        "gradient_matching", models, base, fishers=constant, prior_precision=h * (1 / lam - n)
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
    result = gradient_matching(tensors, base, statistics={"fisher": fishers}, prior_precision=0.5)
    h = [torch.clamp(f, min=1e-6) for f in fishers]
    expected = base + (h[0] * (tensors[0] - base) + h[1] * (tensors[1] - base)) / (
        h[0] + h[1] + 0.5
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
