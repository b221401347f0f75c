"""The Examples sections of the distillation modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "modelfuse.distill.data",
    "modelfuse.distill.distiller",
    "modelfuse.distill.losses",
    "modelfuse.distill.teacher",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
