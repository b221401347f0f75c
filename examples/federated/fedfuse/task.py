"""The model, the data of each client and the training loop (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

SEED = 0
"""The split of the digits into a central test set and the clients' shares is fixed by it."""


def build_model() -> nn.Module:
    """A two-layer MLP for 8x8 digit images, initialised the same way everywhere."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def central_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The last 20% of the shuffled digits: the server's test set, seen by no client."""
    x, y = _digits()
    cut = int(0.8 * len(y))
    return torch.from_numpy(x[cut:]), torch.from_numpy(y[cut:])


def client_data(
    partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s share of the first 80%: 80% for training, 20% held out."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {num_partitions}); give each SuperNode "
            "--node-config 'partition-id=I num-partitions=N' with 0 <= I < N"
        )
    x, y = _digits()
    cut = int(0.8 * len(y))
    shares = np.array_split(np.arange(cut), num_partitions)[partition_id]
    xs, ys = torch.from_numpy(x[shares]), torch.from_numpy(y[shares])
    held_out = max(1, len(ys) // 5)
    return xs[held_out:], ys[held_out:], xs[:held_out], ys[:held_out]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """SGD on cross-entropy; returns the mean loss of the last epoch and a parameter snapshot
    before training and after each epoch (for the update's variance)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    snapshots = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        last = total / len(y)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    return last, snapshots


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of the model on (x, y)."""
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy
