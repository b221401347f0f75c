"""Taps on linear layers: per-example output gradients and inputs instead of weight gradients.

For a linear layer run once per example on a vector input :math:`x_n`, the
per-example gradient of its weight is the outer product :math:`\\delta_n
x_n^\\top` of the gradient :math:`\\delta_n` at its output and its input, so its
square is :math:`\\delta_n^2 (x_n^2)^\\top` and the sum over examples is one
matrix product :math:`(\\delta^2)^\\top x^2`. Taking per-example gradients with
respect to a zero "probe" added to the layer's output (and recording its
input) gives exactly the same Fisher entries as materialising every
per-example weight gradient, at a fraction of the memory traffic.

:class:`LinearTaps` installs forward hooks that add the probes and record the
inputs while a per-example function runs under ``torch.func``, and tells which
layers qualify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["LinearTaps"]


class LinearTaps:
    """Forward hooks on candidate ``nn.Linear`` layers of a model.

    Candidates are linear layers reachable under one name whose parameters
    are not shared with any other module; :meth:`qualified` keeps those that
    ran exactly once on a 2-D input in the last counted forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        names: Counter[int] = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        uses: Counter[int] = Counter(
            id(p) for _, p in model.named_parameters(remove_duplicate=False)
        )
        self.layers: dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or names[id(module)] != 1:
                continue
            if any(uses[id(p)] != 1 for p in module.parameters(recurse=False)):
                continue
            self.layers[name] = module
        self.probes: dict[str, torch.Tensor] | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.calls: Counter[str] = Counter()
        self.dims: dict[str, int] = {}

    def parameter_names(self, layer: str) -> tuple[str, str | None]:
        """The ``state_dict`` names of a layer's weight and bias (None without bias)."""
        prefix = f"{layer}." if layer else ""
        bias = f"{prefix}bias" if self.layers[layer].bias is not None else None
        return f"{prefix}weight", bias

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            self.calls[name] += 1
            self.dims[name] = args[0].dim()
            if self.probes is None or name not in self.probes:
                return None
            self.inputs[name] = args[0]
            return output + self.probes[name]

        return hook

    @contextmanager
    def installed(self) -> Iterator[LinearTaps]:
        """Hooks in place for the duration; removed afterwards, even on error."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.probes = None
            self.inputs = {}

    def reset_counts(self) -> None:
        self.calls.clear()
        self.dims.clear()

    def qualified(self) -> list[str]:
        """Layers that ran exactly once, on a 2-D ``(batch, features)`` input, since the reset."""
        return [n for n in self.layers if self.calls[n] == 1 and self.dims.get(n) == 2]
