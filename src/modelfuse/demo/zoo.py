"""The demo's model zoo: an MLP pre-trained on part of the digits, then fine-tuned many ways.

- the soup scenario: K fine-tunes of the pre-trained model on the whole
  training split, each with its own learning rate, weight decay, seed and
  augmentation (drawn from the run's seed, like a random hyperparameter search);
- the multi-task scenario: one fine-tune per task (original, rotated,
  inverted, noisy digits).

Every model is saved as a Hugging Face style folder (``model.safetensors`` and
``config.json``) so that ``modelfuse merge`` can read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelfuse.checkpoint import CheckpointWriter, open_checkpoint
from modelfuse.demo.data import Splits, apply_task, task_seed
from modelfuse.demo.settings import DemoSettings

__all__ = [
    "Augmentation",
    "FineTune",
    "Zoo",
    "augment_batch",
    "batches",
    "build_zoo",
    "load_mlp",
    "make_mlp",
    "predict_logits",
    "read_checkpoint",
    "train",
    "write_checkpoint",
]

Augmentation = Literal["none", "shift", "noise"]
StateDict = dict[str, torch.Tensor]


def make_mlp(hidden: int, *, n_features: int = 64, n_classes: int = 10) -> nn.Sequential:
    """The demo's network: 64 -> hidden -> hidden -> 10 with ReLU.

    Examples
    --------
    >>> sorted(make_mlp(8).state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight', '4.bias', '4.weight']
    """
    return nn.Sequential(
        nn.Linear(n_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def load_mlp(hidden: int, state_dict: StateDict) -> nn.Sequential:
    """A new :func:`make_mlp` network holding the weights ``state_dict``.

    Examples
    --------
    >>> sd = make_mlp(8).state_dict()
    >>> torch.equal(load_mlp(8, sd)[0].weight, sd["0.weight"])
    True
    """
    net = make_mlp(hidden)
    net.load_state_dict(state_dict)
    return net


def batches(
    x: np.ndarray, y: np.ndarray, size: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, labels)`` tensor batches of ``size`` consecutive rows, in order.

    Examples
    --------
    >>> [len(b) for b, _ in batches(np.zeros((300, 64)), np.zeros(300))]
    [128, 128, 44]
    """
    return [
        (torch.as_tensor(x[i : i + size]), torch.as_tensor(y[i : i + size]))
        for i in range(0, len(x), size)
    ]


def augment_batch(x: torch.Tensor, how: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """A new, augmented copy of a batch of flattened 8x8 images.

    ``"shift"`` moves each image by -1, 0 or 1 pixel in each direction (zeros
    fill in); ``"noise"`` adds Gaussian noise of standard deviation 0.1 and
    clips to [0, 1]; ``"none"`` returns a copy.

    Examples
    --------
    >>> x = torch.zeros(1, 64); x[0, 9] = 1.0  # pixel (1, 1)
    >>> g = torch.Generator().manual_seed(0)
    >>> float(augment_batch(x, "shift", g).sum())
    1.0
    """
    if how == "none":
        return x.clone()
    if how == "noise":
        noise = torch.randn(x.shape, generator=generator) * 0.1
        return (x + noise).clamp(0.0, 1.0)
    images = nn.functional.pad(x.reshape(-1, 8, 8), (1, 1, 1, 1))
    shifts = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x).reshape(-1, 8, 8)
    for dy in range(3):
        for dx in range(3):
            rows = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[rows] = images[rows, dy : dy + 8, dx : dx + 8]
    return out.reshape(x.shape)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    augment: Augmentation = "none",
    batch_size: int = 32,
) -> nn.Module:
    """Train ``model`` in place with AdamW and cross-entropy; batches and augmentation seeded.

    Returns the model, left in evaluation mode.
    """
    generator = torch.Generator().manual_seed(seed)
    xs = torch.as_tensor(x)
    ys = torch.as_tensor(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ys), generator=generator)
        for start in range(0, len(ys), batch_size):
            idx = order[start : start + batch_size]
            inputs = augment_batch(xs[idx], augment, generator)
            optimizer.zero_grad()
            loss_fn(model(inputs), ys[idx]).backward()
            optimizer.step()
    model.eval()
    return model


def predict_logits(model: nn.Module, state_dict: StateDict, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` run with the weights ``state_dict`` on ``x``, as float64 numpy.

    The module's own weights and training flag are left as they were.
    """
    from modelfuse.search import model_outputs

    out = model_outputs(model, state_dict, torch.as_tensor(x, dtype=torch.float32))
    return out.double().numpy()


def write_checkpoint(folder: Path, state_dict: StateDict, config: dict[str, Any]) -> Path:
    """Write a Hugging Face style model folder: ``model.safetensors`` and ``config.json``."""
    layout = [(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]
    with CheckpointWriter(folder, layout, overwrite=True) as writer:
        for name, tensor in state_dict.items():
            writer.write(name, tensor.detach().contiguous())
        writer.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        return writer.commit()


def read_checkpoint(folder: Path) -> StateDict:
    """Every tensor of a checkpoint folder (or file), by name."""
    with open_checkpoint(folder) as checkpoint:
        return {name: checkpoint.read(name).clone() for name in checkpoint.keys()}


@dataclass(frozen=True)
class FineTune:
    """One fine-tuned model: its name, checkpoint folder, weights and training settings."""

    name: str
    path: Path
    state_dict: StateDict = field(repr=False)
    settings: dict[str, Any]


@dataclass(frozen=True)
class Zoo:
    """The trained models of one demo run."""

    model: nn.Module = field(repr=False)
    pretrained: FineTune
    soup: tuple[FineTune, ...]
    tasks: dict[str, FineTune]


def _config(hidden: int, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["DigitsMLP"],
        "model_type": "modelfuse-demo-mlp",
        "layer_sizes": [64, hidden, hidden, 10],
        "activation": "relu",
        "training": settings,
    }


def _soup_settings(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, 1])
    augmentations: tuple[Augmentation, ...] = ("none", "shift", "noise")
    out = []
    for i in range(n):
        out.append(
            {
                "lr": float(np.round(10 ** rng.uniform(-3.5, -2.5), 6)),
                "weight_decay": float(rng.choice([0.0, 1e-4, 1e-2, 5e-2])),
                "seed": int(seed * 1000 + 100 + i),
                "augment": augmentations[i % 3],
            }
        )
    return out


def build_zoo(
    splits: Splits,
    settings: DemoSettings,
    folder: Path,
    seed: int,
    *,
    on_model: Callable[[str], None] | None = None,
    soup_only: bool = False,
) -> Zoo:
    """Pre-train, fine-tune and save every model of the demo into ``folder``.

    ``on_model(name)`` is called after each model is saved (for progress);
    ``soup_only`` leaves out the multi-task scenario's task models.
    """
    tick = on_model or (lambda name: None)
    torch.manual_seed(seed)
    model = make_mlp(settings.hidden)
    pre_settings = {
        "data": "digits, part of the training split",
        "n_examples": int(len(splits.pretrain)),
        "epochs": settings.pretrain_epochs,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "seed": seed,
        "augment": "none",
    }
    train(
        model,
        splits.x_train[splits.pretrain],
        splits.y_train[splits.pretrain],
        epochs=settings.pretrain_epochs,
        lr=1e-3,
        weight_decay=0.0,
        seed=seed,
    )
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = FineTune(
        "pre-trained",
        write_checkpoint(folder / "pretrained", base_sd, _config(settings.hidden, pre_settings)),
        base_sd,
        pre_settings,
    )
    tick(base.name)

    def fine_tune(name: str, x: np.ndarray, hp: dict[str, Any], epochs: int) -> FineTune:
        net = load_mlp(settings.hidden, base_sd)
        train(
            net,
            x,
            splits.y_train,
            epochs=epochs,
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            seed=hp["seed"],
            augment=hp["augment"],
        )
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        info = {**hp, "epochs": epochs, "n_examples": int(len(x))}
        path = write_checkpoint(folder / name, sd, _config(settings.hidden, info))
        tick(name)
        return FineTune(name, path, sd, info)

    soup = []
    for i, hp in enumerate(_soup_settings(settings.n_soup, seed)):
        hp = {"data": "digits, training split", **hp}
        soup.append(fine_tune(f"ft-{i + 1}", splits.x_train, hp, settings.finetune_epochs))
    tasks = {}
    for j, task in enumerate(() if soup_only else settings.tasks):
        hp = {
            "data": f"digits ({task}), training split",
            "task": task,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "seed": int(seed * 1000 + 500 + j),
            "augment": "none",
        }
        x_task = apply_task(task, splits.x_train, task_seed(seed, j, "train"))
        tasks[task] = fine_tune(f"task-{task}", x_task, hp, settings.task_epochs)
    return Zoo(model, base, tuple(soup), tasks)
