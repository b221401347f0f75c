"""``modelfuse.calibration.softmax.sigmoid`` against scipy's expit and the two-class softmax."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from modelfuse.calibration.softmax import sigmoid, softmax


def test_sigmoid_matches_expit_and_the_two_class_softmax() -> None:
    x = np.concatenate([np.linspace(-40.0, 40.0, 801), [-1e4, 1e4]])
    with np.errstate(over="raise"):
        got = sigmoid(x)
    np.testing.assert_allclose(got, expit(x), rtol=1e-12, atol=1e-15)
    two_class = softmax(np.stack([np.zeros_like(x), x], axis=1))[:, 1]
    np.testing.assert_allclose(got, two_class, rtol=1e-12, atol=1e-15)
    assert got[-2] == 0.0 and got[-1] == 1.0
