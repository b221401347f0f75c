"""Checks and small tensor operations on state dicts shared by the searches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from modelfuse.errors import CheckpointError, ConfigError

__all__ = ["check_matching", "check_model_keys", "is_float"]


def is_float(tensor: torch.Tensor) -> bool:
    """Whether a tensor takes part in merging (floating point)."""
    return tensor.dtype.is_floating_point


def _few(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', and {len(items) - limit} more' if len(items) > limit else ''}]"


def check_matching(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], *, where: str = "state_dicts"
) -> None:
    """Raise unless every state dict has the first one's names and shapes."""
    if len(state_dicts) == 0:
        raise ConfigError(f"{where}: no state dicts given; pass at least one model.state_dict()")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts):
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise ConfigError(
                    f"{where}[{i}]: entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "pass model.state_dict()"
                )
        if i == 0:
            continue
        missing = [k for k in first if k not in sd]
        extra = [k for k in sd if k not in first]
        shapes = [
            f"{k} {list(first[k].shape)} vs {list(sd[k].shape)}"
            for k in first
            if k in sd and first[k].shape != sd[k].shape
        ]
        if missing or extra or shapes:
            raise CheckpointError(
                f"{where}[{i}] does not match {where}[0]: missing {_few(missing)}, "
                f"extra {_few(extra)}, shape mismatches {_few(shapes)}; "
                "give models of one architecture"
            )


def check_model_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise unless ``state_dict`` has exactly the names of ``model.state_dict()``."""
    expected = set(model.state_dict().keys())
    given = set(state_dict.keys())
    if expected != given:
        raise CheckpointError(
            f"{where}: the state dict does not fit the model: missing "
            f"{_few(sorted(expected - given))}, unexpected {_few(sorted(given - expected))}; "
            f"pass weights of the model's architecture ({type(model).__name__})"
        )
