"""Fixtures of the checkpoint tests; puts this folder on sys.path for checkpoint_testing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoint_testing import make_tensors  # noqa: E402


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return make_tensors()
