"""Teachers of every kind as logits functions: ensembles averaged as written out, no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax as sp_softmax
from sklearn.linear_model import LogisticRegression
from torch import nn

from modelfuse.distill import teacher_function, teacher_logits
from modelfuse.ensemble import VotingEnsemble
from modelfuse.errors import ConfigError, DataError


def _net(seed: int, n_in: int = 4, n_out: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, n_out))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def _x(n: int = 9) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def _eval_logits(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The network's logits in evaluation mode, computed apart from the code under test."""
    h = torch.relu(net[0](x))
    return net[3](h).detach().double().numpy()


def test_single_module_gives_its_logits_in_eval_mode_and_restores_flags() -> None:
    net = _net(0).train()
    net[1].eval()  # a mixed state, which must come back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _x()
    out = teacher_logits(net, x, batch_size=4)  # dropout off: the same as the written-out pass
    np.testing.assert_allclose(out.numpy(), _eval_logits(net, x), rtol=1e-6, atol=1e-6)
    assert not out.requires_grad
    assert net.training and not net[1].training and net[0].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_ensemble_averages_probabilities() -> None:
    members, x = [_net(0), _net(1), _net(2)], _x()
    p = np.mean([sp_softmax(_eval_logits(m, x), axis=1) for m in members], axis=0)
    out = teacher_logits(members, x)
    np.testing.assert_allclose(np.exp(out.numpy()), p, rtol=1e-5, atol=1e-7)


def test_weighted_ensemble_and_logit_average() -> None:
    members, x = [_net(0), _net(1)], _x()
    z = [_eval_logits(m, x) for m in members]
    out = teacher_logits(members, x, weights=[3.0, 1.0])
    p = 0.75 * sp_softmax(z[0], axis=1) + 0.25 * sp_softmax(z[1], axis=1)
    np.testing.assert_allclose(np.exp(out.numpy()), p, rtol=1e-5, atol=1e-7)
    geometric = teacher_logits(members, x, average="logits")
    log_p = [z_i - np.log(np.exp(z_i).sum(axis=1, keepdims=True)) for z_i in z]
    expected = sp_softmax((log_p[0] + log_p[1]) / 2, axis=1)
    np.testing.assert_allclose(
        sp_softmax(geometric.numpy().astype(np.float64), axis=1), expected, rtol=1e-5
    )


def test_fitted_model_with_predict_proba_and_callables() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0).astype(int)
    lr = LogisticRegression(max_iter=500).fit(X, y)
    ensemble = VotingEnsemble([lr, lambda a: lr.predict_proba(a)]).fit(X, y)
    out = teacher_logits(ensemble, torch.from_numpy(X))
    np.testing.assert_allclose(np.exp(out.numpy()), lr.predict_proba(X), rtol=1e-5, atol=1e-7)
    numpy_logits = teacher_logits(lambda a: np.asarray(a) @ np.ones((4, 2)), torch.ones(3, 4))
    np.testing.assert_array_equal(numpy_logits.numpy(), np.full((3, 2), 4.0, dtype=np.float32))


def test_zero_probabilities_give_minus_inf() -> None:
    f = teacher_function([lambda a: torch.tensor([[0.0, 5.0]]).repeat(len(a), 1)])
    out = f(torch.zeros(2, 1))
    assert torch.isfinite(out[:, 1]).all() and float(out[0, 0]) < -4.9  # log softmax of logits
    prob = type("P", (), {"predict_proba": lambda self, a: np.tile([[0.0, 1.0]], (len(a), 1))})()
    out = teacher_logits(prob, torch.zeros(2, 1))
    assert out[0, 0] == -np.inf and out[0, 1] == 0.0


@pytest.mark.parametrize(
    "teacher, kwargs, error, words",
    [
        (42, {}, ConfigError, "neither an nn.Module"),
        ([], {}, ConfigError, "empty list"),
        ([_net(0), _net(1)], {"weights": [1.0]}, ConfigError, "weights"),
        ([_net(0), _net(1)], {"weights": [1.0, -1.0]}, ConfigError, "weights"),
        (_net(0), {"weights": [1.0]}, ConfigError, "single teacher"),
        (_net(0), {"average": "median"}, ConfigError, "average"),
        (_net(0), {"batch_size": 0}, ConfigError, "batch_size"),
        ([_net(0), _net(1, n_out=4)], {}, DataError, "same classes"),
        (lambda a: torch.full((len(a), 3), float("nan")), {}, DataError, "NaN"),
        (lambda a: torch.zeros(len(a)), {}, DataError, "n_classes"),
        (lambda a: "logits", {}, DataError, "returned str"),
    ],
)
def test_bad_teachers(teacher, kwargs, error, words) -> None:
    with pytest.raises(error, match=words):
        teacher_logits(teacher, _x(), **kwargs)
