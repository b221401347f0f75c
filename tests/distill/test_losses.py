"""distillation_loss against the formula written out with NumPy/SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import softmax as sp_softmax

from modelfuse.distill import agreement, distillation_loss, soft_kl
from modelfuse.errors import ConfigError, DataError


def _kl_rows(t: np.ndarray, s: np.ndarray, temperature: float) -> float:
    """mean_i sum_k p_ik (log p_ik - log q_ik), p = softmax(t/T), q = softmax(s/T)."""
    p = sp_softmax(t / temperature, axis=1)
    log_p = sp_log_softmax(t / temperature, axis=1)
    log_q = sp_log_softmax(s / temperature, axis=1)
    return float(np.mean(np.sum(p * (log_p - log_q), axis=1)))


@pytest.fixture
def logits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 5)) * 2
    t = rng.normal(size=(7, 5)) * 3
    y = rng.integers(0, 5, size=7)
    return s, t, y


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
def test_soft_term_is_t_squared_times_kl(logits, temperature: float) -> None:
    s, t, _ = logits
    got = distillation_loss(torch.tensor(s), torch.tensor(t), temperature=temperature)
    expected = temperature**2 * _kl_rows(t, s, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    assert float(soft_kl(torch.tensor(s), torch.tensor(t), temperature)) == pytest.approx(
        _kl_rows(t, s, temperature), rel=1e-10
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_with_labels_mixes_kl_and_cross_entropy(logits, alpha: float) -> None:
    s, t, y = logits
    temperature = 3.0
    ce = -np.mean(sp_log_softmax(s, axis=1)[np.arange(len(y)), y])  # at temperature 1
    expected = alpha * temperature**2 * _kl_rows(t, s, temperature) + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_gradient_is_t_times_the_difference_of_softened_probabilities(logits) -> None:
    """d/ds [T^2 KL(p_T || q_T)] / n-mean = T (q_T - p_T) / n: the T^2 keeps gradients O(1/T)."""
    s, t, _ = logits
    for temperature in (1.0, 2.0, 8.0):
        student = torch.tensor(s, requires_grad=True)
        distillation_loss(student, torch.tensor(t), temperature=temperature).backward()
        q = sp_softmax(s / temperature, axis=1)
        p = sp_softmax(t / temperature, axis=1)
        expected = temperature * (q - p) / s.shape[0]
        np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_soft_only_ignores_labels(logits) -> None:
    s, t, y = logits
    base = distillation_loss(torch.tensor(s), torch.tensor(t), temperature=2.0)
    for labels in (torch.tensor(y), torch.tensor((y + 1) % 5), torch.full((7,), 99)):
        got = distillation_loss(
            torch.tensor(s), torch.tensor(t), labels, temperature=2.0, alpha=0.2, soft_only=True
        )
        assert float(got) == float(base)


def test_identical_logits_give_zero_and_teacher_gets_no_gradient() -> None:
    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    teacher = z.detach().clone().requires_grad_(True)
    loss = distillation_loss(z, teacher, temperature=3.0)
    assert loss.item() == 0.0
    loss.backward()
    assert teacher.grad is None


def test_zero_probability_classes_of_the_teacher() -> None:
    """Teacher log-probabilities of -inf (an ensemble's probability 0) count 0 log 0 = 0."""
    s = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[math.log(0.25), -math.inf, math.log(0.75)]], dtype=torch.float64)
    loss = distillation_loss(s, t, temperature=1.0)
    log_q = sp_log_softmax(s.detach().numpy(), axis=1)[0]
    expected = 0.25 * (math.log(0.25) - log_q[0]) + 0.75 * (math.log(0.75) - log_q[2])
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_agreement_counts_matching_top_classes() -> None:
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [3.0, 4.0, 0.0]])
    assert agreement(s, t) == 0.75


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"temperature": 0.0}, ConfigError, "temperature"),
        ({"temperature": -1.0}, ConfigError, "temperature"),
        ({"temperature": float("nan")}, ConfigError, "temperature"),
        ({"alpha": 1.5}, ConfigError, "alpha"),
        ({"alpha": -0.1}, ConfigError, "alpha"),
    ],
)
def test_bad_parameters(kwargs, error, words) -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(error, match=words):
        distillation_loss(z, z, torch.tensor([0, 1]), **kwargs)


def test_bad_shapes_and_labels() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(DataError, match="same"):
        distillation_loss(z, torch.zeros(2, 4))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\)"):
        distillation_loss(z, z, torch.tensor([0, 3]))
    with pytest.raises(DataError, match="one label per row"):
        distillation_loss(z, z, torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="same"):
        agreement(z, torch.zeros(3, 3))
