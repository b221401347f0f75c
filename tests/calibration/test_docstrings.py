"""The Examples sections of the calibration modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "modelfuse.calibration.base",
    "modelfuse.calibration.cross_validation",
    "modelfuse.calibration.metrics",
    "modelfuse.calibration.one_vs_rest",
    "modelfuse.calibration.registry",
    "modelfuse.calibration.reliability",
    "modelfuse.calibration.saved",
    "modelfuse.calibration.scaling",
    "modelfuse.calibration.softmax",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
