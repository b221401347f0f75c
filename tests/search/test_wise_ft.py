import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.search import accuracy_score, wise_ft_sweep


def test_sweep_scores_every_interpolation(digits):
    score = accuracy_score(digits.model, [(digits.x_val, digits.y_val)])
    zs, ft = digits.base, digits.fine_tuned[0]
    result = wise_ft_sweep(zs, ft, score, alphas=5)
    alphas = [c.parameters["alpha"] for c in result.trace]
    assert alphas == list(np.linspace(0, 1, 5))
    for cand in result.trace:
        a = cand.parameters["alpha"]
        by_hand = {k: (1 - a) * zs[k] + a * ft[k] for k in zs}
        assert cand.score == score(by_hand)
    assert result.trace[0].score == score(zs)
    assert result.trace[-1].score == score(ft)
    best = max(result.trace, key=lambda c: c.score)
    assert result.parameters["alpha"] == best.parameters["alpha"]
    assert result.score == best.score


def test_sweep_accepts_explicit_alphas_and_rejects_bad_ones():
    zs, ft = {"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}
    result = wise_ft_sweep(zs, ft, lambda sd: -abs(float(sd["w"]) - 1.5), alphas=[0.9, 0.75, 0.1])
    assert result.parameters == {"alpha": 0.75}
    assert float(result.state_dict["w"]) == pytest.approx(1.5)
    with pytest.raises(ConfigError, match=r"alphas: expected values in \[0, 1\]"):
        wise_ft_sweep(zs, ft, lambda sd: 0.0, alphas=[0.5, 1.5])
