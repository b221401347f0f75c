import copy

import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.search import adamerging


def entropy_by_loading(model, state_dict, x):
    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict)
    clone.eval()
    with torch.no_grad():
        p = torch.softmax(clone(x), dim=1)
    return float(-(p * torch.log(p)).sum(dim=1).mean())


def task_arithmetic_by_hand(base, models, lambdas_for):
    return {
        k: base[k] + sum(lam * (m[k] - base[k]) for lam, m in zip(lambdas_for(k), models))
        for k in base
    }


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_lowers_the_entropy_on_its_data(digits, granularity):
    models = digits.fine_tuned[:2]
    x = digits.x_val
    batches = [x[:200], (x[200:], digits.y_val[200:])]
    result = adamerging(
        digits.model,
        digits.base,
        models,
        batches,
        granularity=granularity,
        steps=30,
        lr=0.05,
    )
    start = task_arithmetic_by_hand(digits.base, models, lambda k: [0.3, 0.3])
    lambdas = result.parameters["lambdas"]
    if granularity == "task":
        assert len(lambdas) == 2
        merged = task_arithmetic_by_hand(digits.base, models, lambda k: lambdas)
    else:
        assert set(lambdas) == set(digits.base)
        merged = task_arithmetic_by_hand(digits.base, models, lambda k: lambdas[k])
    for k in merged:
        torch.testing.assert_close(result.state_dict[k], merged[k])
    before = entropy_by_loading(digits.model, start, x)
    after = entropy_by_loading(digits.model, result.state_dict, x)
    assert after < before - 0.01
    assert -result.score == pytest.approx(after, rel=1e-4)
    values = list(lambdas) if granularity == "task" else [v for t in lambdas.values() for v in t]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(result.trace) == 30
    first = result.trace[0].parameters["lambdas"]
    first = list(first) if granularity == "task" else [v for t in first.values() for v in t]
    assert first == pytest.approx([0.3] * len(first))


def test_adamerging_leaves_the_model_alone_and_checks_options(digits):
    model = copy.deepcopy(digits.model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adamerging(model, digits.base, digits.fine_tuned[:1], [digits.x_val[:50]], steps=2)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="granularity: expected one of task, layer"):
        adamerging(model, digits.base, digits.fine_tuned, [digits.x_val], granularity="block")
    with pytest.raises(ConfigError, match="init_lambda"):
        adamerging(model, digits.base, digits.fine_tuned, [digits.x_val], init_lambda=2.0)


def test_layer_groups_share_one_coefficient_per_task(digits):
    models = digits.fine_tuned[1:3]
    result = adamerging(
        digits.model,
        digits.base,
        models,
        [digits.x_val],
        granularity="layer",
        steps=5,
        lr=0.05,
        layer_of=lambda name: name.split(".")[0],
    )
    lambdas = result.parameters["lambdas"]
    assert set(lambdas) == {"0", "2"}
    assert lambdas["0"] != lambdas["2"]
    merged = task_arithmetic_by_hand(digits.base, models, lambda k: lambdas[k.split(".")[0]])
    for k in merged:
        torch.testing.assert_close(result.state_dict[k], merged[k])
    with pytest.raises(ConfigError, match="layer_of: only used with granularity='layer'"):
        adamerging(digits.model, digits.base, models, [digits.x_val], layer_of=str)
