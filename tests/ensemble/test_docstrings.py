"""The Examples sections of the ensemble modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "modelfuse.ensemble.cascade",
    "modelfuse.ensemble.quantile",
    "modelfuse.ensemble.saved",
    "modelfuse.ensemble.selection",
    "modelfuse.ensemble.stacking",
    "modelfuse.ensemble.two_tier",
    "modelfuse.ensemble.voting",
    "modelfuse.ensemble.weights",
    "modelfuse.ensemble.wrappers",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
