"""Grid and Dirichlet-random search over any merge method's parameters."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.executors import Executor, resolve_executor
from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.registry import get_method
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._evaluation import describe
from modelfuse.search._state import check_matching
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score

__all__ = ["grid_search", "merge_with_settings", "random_search"]


def _split_settings(
    method: MergeMethod, n_models: int, settings: Mapping[str, Any], where: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global settings from one flat mapping of parameter values.

    A per-model parameter (``weight``, ``density``) takes a scalar (the same for
    every model) or a sequence of one value per model.
    """
    declaration = method.parameters
    per_model = set(declaration.per_model_fields())
    models: list[dict[str, Any]] = [{} for _ in range(n_models)]
    global_settings: dict[str, Any] = {}
    for key, value in settings.items():
        field = declaration.field_for(key)
        if field is None:
            valid = ", ".join(declaration.config_name(f) for f in declaration.model_fields)
            raise ConfigError(
                f"{where}: unknown parameter {key!r} for merge method {method.name!r}; "
                f"valid parameters: {valid or 'none'}"
            )
        if field in per_model:
            if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
                values = [float(v) if not isinstance(v, bool) else v for v in value]
                if len(values) != n_models:
                    raise ConfigError(
                        f"{where}: {key!r} has {len(values)} values for {n_models} models; "
                        "give one value per model or a single value for all"
                    )
            else:
                values = [value] * n_models
            for entry, v in zip(models, values):
                entry[key] = v
        else:
            global_settings[key] = value
    return models, global_settings


def merge_with_settings(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    settings: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Merge with one flat mapping of parameter values, as the searches write them.

    Parameters
    ----------
    method : str
        A registered merge method (see ``modelfuse.merge.METHODS``).
    state_dicts : sequence of mappings name -> Tensor
        The models. Not modified.
    base : mapping name -> Tensor or None
        The base model, for methods that need one.
    settings : mapping
        Parameter name (as in configurations, e.g. ``"lambda"``) -> value. A
        per-model parameter takes one value for all models or a sequence of
        one value per model.

    Returns
    -------
    dict name -> Tensor

    Examples
    --------
    >>> a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}
    >>> merge_with_settings("linear", [a, b], None, {"weight": [3, 1]})["w"]
    tensor([1.])
    """
    merge_method = get_method(method, where="method")
    per_model, global_settings = _split_settings(
        merge_method, len(state_dicts), settings, "settings"
    )
    return merge_state_dicts(
        method, state_dicts, base, model_parameters=per_model, **global_settings
    )


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        return tuple(float(v) if not isinstance(v, bool) else v for v in value)
    return value


class _Evaluate:
    """Merge one candidate and score it; a picklable callable for executors."""

    def __init__(
        self,
        method: str,
        state_dicts: Sequence[Mapping[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor] | None,
        score: Score,
    ) -> None:
        self.method = method
        self.state_dicts = state_dicts
        self.base = base
        self.score = score

    def __repr__(self) -> str:
        return f"the score {describe(self.score)} of {self.method} merges"

    def __call__(self, settings: Mapping[str, Any]) -> float:
        merged = merge_with_settings(self.method, self.state_dicts, self.base, settings)
        return float(self.score(merged))


def _run(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    candidates: Sequence[Mapping[str, Any]],
    score: Score,
    executor: Executor | None = None,
) -> SearchResult:
    trace: list[Candidate] = []
    best: tuple[float, dict[str, Any], dict[str, torch.Tensor]] | None = None
    if executor is not None:
        evaluate = _Evaluate(method, state_dicts, base, score)
        scores = resolve_executor(executor).map(evaluate, [dict(c) for c in candidates])
        best_index = -1
        for index, (settings, s) in enumerate(zip(candidates, scores, strict=True)):
            trace.append(Candidate({k: _freeze(v) for k, v in settings.items()}, s))
            if best_index < 0 or s > trace[best_index].score:
                best_index = index
        if best_index < 0:
            raise ConfigError("the search space is empty; give at least one value per parameter")
        merged = merge_with_settings(method, state_dicts, base, candidates[best_index])
        return SearchResult(
            dict(trace[best_index].parameters), merged, trace[best_index].score, tuple(trace)
        )
    for settings in candidates:
        frozen = {k: _freeze(v) for k, v in settings.items()}
        merged = merge_with_settings(method, state_dicts, base, settings)
        s = float(score(merged))
        trace.append(Candidate(frozen, s))
        if best is None or s > best[0]:
            best = (s, frozen, merged)
    if best is None:
        raise ConfigError("the search space is empty; give at least one value per parameter")
    return SearchResult(best[1], best[2], best[0], tuple(trace))


def _check_common(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    fixed: Mapping[str, Any] | None,
    searched: Sequence[str],
) -> MergeMethod:
    merge_method = get_method(method, where="method")
    check_matching(state_dicts)
    both = sorted(set(fixed or {}) & set(searched))
    if both:
        raise ConfigError(
            f"parameters: {both} are both searched and fixed; remove them from one of the two"
        )
    _split_settings(merge_method, len(state_dicts), dict(fixed or {}), "parameters")
    _split_settings(merge_method, len(state_dicts), {k: 1.0 for k in searched}, "space")
    return merge_method


def grid_search(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    space: Mapping[str, Sequence[Any]],
    score: Score,
    *,
    parameters: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
) -> SearchResult:
    """Try every combination of parameter values and keep the best-scoring merge.

    Parameters
    ----------
    method : str
        Any registered merge method (``"linear"``, ``"task_arithmetic"``,
        ``"ties"``, ...).
    state_dicts : sequence of mappings name -> Tensor
        The models to merge. Not modified.
    base : mapping name -> Tensor or None
        The base model, for methods that need one.
    space : mapping name -> list
        For each parameter (named as in configurations, e.g. ``"lambda"``,
        ``"density"``), the values to try. A value of a per-model parameter
        (``weight``) is one number for every model or a list of one number
        per model. The grid is the Cartesian product, in the order given
        (the last parameter varies fastest).
    score : callable
        ``score(state_dict) -> float``, higher is better.
    parameters : mapping, optional
        Fixed settings applied to every candidate.
    executor : Executor, optional
        Evaluates the candidates (merge and score), e.g.
        ``modelfuse.executors.LocalExecutor(workers=2)`` or ``RayExecutor()``;
        ``score`` must then be picklable. None (default) evaluates them one by
        one in this process. The result is the same either way.

    Returns
    -------
    SearchResult
        ``parameters``: the best candidate's settings (the first one on
        ties); ``trace``: every grid point in order.

    Examples
    --------
    >>> base = {"w": torch.tensor([0.0])}
    >>> ft = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    >>> r = grid_search("task_arithmetic", ft, base, {"lambda": [0.25, 0.5, 1.0]},
    ...                 lambda sd: -abs(float(sd["w"]) - 2.0))
    >>> r.parameters, r.state_dict["w"]
    ({'lambda': 0.5}, tensor([2.]))
    """
    _check_common(method, state_dicts, parameters, list(space))
    keys = list(space)
    for key in keys:
        if isinstance(space[key], (str, bytes)) or not hasattr(space[key], "__iter__"):
            raise ConfigError(
                f"space[{key!r}]: expected a list of values to try, got {space[key]!r}"
            )
    values = [list(space[k]) for k in keys]
    candidates = [
        {**dict(parameters or {}), **dict(zip(keys, combo))} for combo in itertools.product(*values)
    ]
    return _run(method, state_dicts, base, candidates, score, executor)


def random_search(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    score: Score,
    *,
    n_trials: int = 20,
    space: Mapping[str, Sequence[Any]] | None = None,
    concentration: float = 1.0,
    seed: int = 0,
    parameters: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
) -> SearchResult:
    """Random search: per-model weights from a Dirichlet, other parameters from lists.

    Each trial draws the per-model ``weight`` vector from
    :math:`\\mathrm{Dirichlet}(c, \\dots, c)` (weights positive, summing to
    one) and every parameter in ``space`` uniformly from its list of values.

    Parameters
    ----------
    method : str
        Any registered merge method with a per-model ``weight`` parameter.
    state_dicts : sequence of mappings name -> Tensor
        The models to merge. Not modified.
    base : mapping name -> Tensor or None
        The base model, for methods that need one.
    score : callable
        ``score(state_dict) -> float``, higher is better.
    n_trials : int, default 20
        Candidates drawn and evaluated.
    space : mapping name -> list, optional
        Further parameters to draw, e.g. ``{"lambda": [0.5, 1.0, 1.5]}``.
    concentration : float, default 1.0
        The Dirichlet's concentration ``c``: 1 is uniform on the simplex,
        larger values favour equal weights, smaller ones sparse weights.
    seed : int, default 0
        Seed of the ``numpy.random.Generator``; equal seeds give equal traces.
    parameters : mapping, optional
        Fixed settings applied to every candidate.
    executor : Executor, optional
        Evaluates the candidates (merge and score), e.g.
        ``modelfuse.executors.LocalExecutor(workers=2)`` or ``RayExecutor()``;
        ``score`` must then be picklable. None (default) evaluates them one by
        one in this process. The result is the same either way.

    Returns
    -------
    SearchResult
        ``parameters``: the best trial's settings, with ``"weight"`` a tuple
        of per-model weights; ``trace``: every trial in order.

    References
    ----------
    Bergstra and Bengio, "Random search for hyper-parameter optimization",
    JMLR 2012.

    Examples
    --------
    >>> sds = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
    >>> r = random_search("linear", sds, None, lambda sd: -abs(float(sd["w"]) - 0.7),
    ...                   n_trials=50, seed=0)
    >>> abs(r.parameters["weight"][1] - 0.7) < 0.05
    True
    """
    if "weight" not in get_method(method, where="method").parameters.per_model_fields():
        raise ConfigError(
            f"method: {method!r} has no per-model 'weight' parameter to draw from a Dirichlet; "
            "use grid_search for its parameters"
        )
    _check_common(method, state_dicts, parameters, ["weight", *(space or {})])
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"n_trials: expected a positive integer, got {n_trials!r}")
    if not concentration > 0:
        raise ConfigError(f"concentration: expected a positive number, got {concentration!r}")
    space = dict(space or {})
    for key, options in space.items():
        if isinstance(options, (str, bytes)) or len(list(options)) == 0:
            raise ConfigError(
                f"space[{key!r}]: expected a non-empty list of values, got {options!r}"
            )
    rng = np.random.default_rng(seed)
    n = len(state_dicts)
    candidates = []
    for _ in range(n_trials):
        settings: dict[str, Any] = dict(parameters or {})
        settings["weight"] = tuple(float(w) for w in rng.dirichlet([concentration] * n))
        for key, options in space.items():
            options = list(options)
            settings[key] = options[int(rng.integers(len(options)))]
        candidates.append(settings)
    return _run(method, state_dicts, base, candidates, score, executor)
