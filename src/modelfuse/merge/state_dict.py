"""Merging state dicts held in memory, for people holding ``nn.Module``s."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.config import resolve_dtype
from modelfuse.merge.config_plan import match_prefixes
from modelfuse.merge.execute import execute_plan
from modelfuse.merge.plan import ModelInput, TensorTask, build_plan
from modelfuse.merge.registry import get_method

__all__ = ["StateDictSource", "merge_state_dicts"]


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: torch.dtype


class StateDictSource:
    """A state dict seen through the same interface as a checkpoint on disk."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str) -> None:
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ConfigError(
                    f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "pass model.state_dict()"
                )
        self._tensors = state_dict
        self.label = label

    def keys(self) -> list[str]:
        return list(self._tensors.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> _Header:
        tensor = self._tensors[name]
        return _Header(tuple(tensor.shape), tensor.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].detach()[start:stop]


def merge_state_dicts(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    weights: Sequence[float] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    fishers: Sequence[Mapping[str, torch.Tensor]] | None = None,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
    base_fisher: Mapping[str, torch.Tensor] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    threads: int = 1,
    allow_prefix: bool = False,
    heads: Literal["drop"] | None = None,
    **parameters: Any,
) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory with any registered method.

    Parameters
    ----------
    method : str
        A merge method's name (``"linear"``, ``"task_arithmetic"``, ...; see
        ``modelfuse.merge.METHODS``).
    state_dicts : sequence of mappings name -> Tensor
        The models to merge (e.g. ``[m.state_dict() for m in models]``). Not modified.
    base : mapping name -> Tensor, optional
        The base (pre-trained) model, for methods that use task vectors.
    weights : sequence of float, optional
        Shorthand for the per-model ``weight`` parameter.
    model_parameters : sequence of mappings, optional
        Per-model parameter settings, one mapping per model, as under
        ``models[i].parameters`` in a configuration.
    fishers, grams : sequence of mappings, optional
        Per-model statistics for data-aware methods (Fisher diagonals, Gram matrices).
    base_fisher : mapping name -> Tensor, optional
        The base model's Fisher diagonal, for ``gradient_matching`` (its
        :math:`H_0`); needs ``base`` and ``fishers``.
    dtype, out_dtype : {"float32", "float16", "bfloat16"}, optional
        Compute dtype the inputs are cast to, and dtype of the result
        (default: the input's). Accumulation is in float32 either way.
    threads : int, default 1
        Tensors merged at once.
    allow_prefix : bool, default False
        Match models whose names differ by a prefix (a classifier's ``bert.``
        around a ``BertModel`` base); the result takes the reference's names
        (the base's, else the first model's).
    heads : {"drop"}, optional
        Leave out the tensors only some models have (their task heads) instead
        of refusing them; put a head back with
        :func:`~modelfuse.merge.name_matching.with_merged_backbone`. Buffers
        (``position_ids``, ...) only some models store are copied either way.
    **parameters
        Global parameter settings (scalars, gradients or name filters), as
        under ``parameters`` in a configuration; ``lambda`` may be given as
        ``lambda_``.

    Returns
    -------
    dict name -> Tensor
        New tensors; the inputs are left untouched.

    Examples
    --------
    >>> a = {"w": torch.tensor([1.0, 2.0])}
    >>> b = {"w": torch.tensor([3.0, 6.0])}
    >>> merge_state_dicts("linear", [a, b], weights=[1, 3])["w"]
    tensor([2.5000, 5.0000])
    """
    merge_method = get_method(method, where="method")
    n = len(state_dicts)
    if model_parameters is not None and len(model_parameters) != n:
        raise ConfigError(
            f"model_parameters: {len(model_parameters)} entries for {n} models; give one per model"
        )
    per_model = [dict(p) for p in model_parameters] if model_parameters else [{} for _ in range(n)]
    if weights is not None:
        if len(weights) != n:
            raise ConfigError(f"weights: {len(weights)} weights for {n} models; give one per model")
        for entry, w in zip(per_model, weights):
            entry["weight"] = float(w)
    if fishers is not None and grams is not None:
        raise ConfigError("give fishers or grams, not both")
    stats = fishers if fishers is not None else grams
    if stats is not None and len(stats) != n:
        raise ConfigError(f"statistics: {len(stats)} entries for {n} models; give one per model")
    if base_fisher is not None and (base is None or fishers is None):
        raise ConfigError(
            "base_fisher: the base model's Fisher is read with a base and the models' Fishers; "
            "pass base= and fishers= too"
        )
    if base_fisher is not None and not merge_method.base_statistics:
        raise ConfigError(
            f"base_fisher: method {method!r} does not read the base model's Fisher; use "
            "gradient_matching or leave base_fisher out"
        )
    if "lambda_" in parameters:
        parameters["lambda"] = parameters.pop("lambda_")
    if heads not in (None, "drop"):
        raise ConfigError(
            f"heads: {str(heads)[:40]!r} is not an option in memory; heads='drop' leaves them "
            "out (each model's head stays in its own state dict: with_merged_backbone puts "
            "one back)"
        )

    models = [
        ModelInput(
            label=f"model {i}",
            source=StateDictSource(sd, f"model {i}"),
            parameters=per_model[i],
            statistics=None if stats is None else StateDictSource(stats[i], f"statistics {i}"),
        )
        for i, sd in enumerate(state_dicts)
    ]
    base_input = None
    if base is not None:
        base_stats = None
        if base_fisher is not None:
            base_stats = StateDictSource(base_fisher, "base_fisher")
        base_input = ModelInput("base", StateDictSource(base, "base"), statistics=base_stats)
    if allow_prefix:
        match_prefixes(models, base_input, [])
    plan = build_plan(
        merge_method,
        models,
        base_input,
        parameters,
        compute_dtype=resolve_dtype(dtype),
        out_dtype=resolve_dtype(out_dtype, key="out_dtype"),
        heads=heads,
    )
    out: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def keep(task: TensorTask, tensor: torch.Tensor, start: int | None) -> None:
        if start is None:
            out[task.name] = tensor
            return
        with lock:
            if task.name not in out:
                out[task.name] = torch.empty(task.shape, dtype=task.out_dtype)
        out[task.name][start : start + tensor.shape[0]] = tensor

    with torch.no_grad():
        execute_plan(plan, keep, threads=threads)
    return {task.name: out[task.name] for task in plan.tasks}
