"""Small MLPs trained on sklearn's digits, shared by the search tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    model: nn.Module
    base: dict[str, torch.Tensor]
    fine_tuned: tuple[dict[str, torch.Tensor], ...]


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.fixture(scope="session")
def digits() -> Digits:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        return _train_digits()
    finally:
        torch.set_num_threads(threads)


def _train_digits() -> Digits:
    data = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[order], dtype=torch.long)
    x_train, y_train, x_val, y_val = x[:1000], y[:1000], x[1000:1400], y[1000:1400]
    model = make_mlp(0)
    train(model, x_train[:200], y_train[:200], steps=20, lr=1e-2)  # a weak "pre-trained" model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fine_tuned = []
    for i in range(4):
        ft = copy.deepcopy(model)
        idx = torch.from_numpy(np.random.default_rng(10 + i).choice(1000, 300, replace=False))
        torch.manual_seed(100 + i)
        train(ft, x_train[idx], y_train[idx], steps=40 + 20 * i, lr=5e-3 * (i + 1))
        fine_tuned.append({k: v.clone() for k, v in ft.state_dict().items()})
    return Digits(x_train, y_train, x_val, y_val, model, base, tuple(fine_tuned))
