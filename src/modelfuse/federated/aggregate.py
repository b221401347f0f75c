r"""One federated round's aggregation: clients' models in, the next global model out.

The functional core of :class:`modelfuse.federated.MergeStrategy`, free of
Flower: clients' replies arrive as :class:`ClientUpdate` (arrays that are
read one tensor at a time: torch tensors, NumPy arrays or Flower ``Array``
objects), every reply is checked, and the global model is merged tensor by
tensor with modelfuse's merge methods, so memory holds a few tensors per
client at a time besides the new global model.

Every aggregation is a setting of one procedure (see :data:`AGGREGATORS`):

1. check each reply (tensor names and shapes against the global model, finite
   values, a positive example count, the statistics the method reads);
2. give each kept client a weight (its example count :math:`n_i`, times what
   the method adds: a precision, a robustness factor, a participation weight);
3. merge each tensor of the kept clients with a merge method of
   :mod:`modelfuse.merge` (``linear``, ``fisher``, ``regmean``, ``ties``,
   ``dare_ties``, ``breadcrumbs``), the current global model as the base for
   the methods that read updates :math:`\Delta_i = \theta_i - \theta_g`;
4. for FedAvgM and FedAU, take a server step from the current global model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelfuse.errors import ConfigError, DataError
from modelfuse.federated.aggregators import AGGREGATORS
from modelfuse.federated.replies import as_tensor, check_update, is_floating, listed_names
from modelfuse.federated.settings import AggregationSettings
from modelfuse.federated.updates import ClientUpdate, Participation, ServerState, SkippedClient
from modelfuse.merge.execute import tensor_generator
from modelfuse.merge.registry import get_method

__all__ = ["RoundAggregation", "aggregate", "prepare_round"]


@dataclass
class RoundAggregation:
    """A checked round: the kept clients, their weights and the merge still to run.

    Build it with :func:`prepare_round`; :meth:`tensors` merges the global
    model tensor by tensor (and updates the server state as it goes).

    Attributes
    ----------
    kept : list of ClientUpdate
        The clients aggregated, in reply order.
    skipped : list of SkippedClient
        The clients left out, with the reason.
    weights : list of float
        Each kept client's weight (relative; see the method).
    """

    settings: AggregationSettings
    global_arrays: Mapping[str, Any]
    kept: list[ClientUpdate]
    skipped: list[SkippedClient]
    weights: list[float]
    state: ServerState
    server_round: int
    statistics_names: dict[str, frozenset[str]] = field(default_factory=dict)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the new global model, in the global model's order.

        Each tensor is new (nothing given is modified), in the global tensor's dtype.
        """
        if not self.kept:
            return
        with torch.no_grad():
            for name, global_value in self.global_arrays.items():
                base = as_tensor(global_value)
                tensors = [as_tensor(update.arrays[name]) for update in self.kept]
                if base.dtype.is_floating_point:
                    merged = self._merge(name, tensors, base)
                    yield name, merged.to(base.dtype)
                else:  # integer buffers (batch counts): the n_i-weighted mean, rounded
                    mean = _linear(tensors, [u.num_examples for u in self.kept])
                    yield name, mean.round().to(base.dtype)

    def _merge(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        s = self.settings
        method = s.method
        examples = [u.num_examples for u in self.kept]
        if method in ("linear", "uncertainty", "residual"):
            return _linear(tensors, self.weights)
        if method == "fedavgm":
            average = _linear(tensors, examples)
            base32 = base.to(torch.float32)
            pseudo_gradient = base32 - average
            previous = self.state.momentum.get(name)
            if previous is None or s.server_momentum == 0.0:
                velocity = pseudo_gradient
            else:
                velocity = previous.mul(s.server_momentum).add_(pseudo_gradient)
            if s.server_momentum > 0.0:
                self.state.momentum[name] = velocity
            return base32 - s.server_learning_rate * velocity
        if method == "fedau":
            base32 = base.to(torch.float32)
            total = _linear(tensors, self.weights, normalize=False)
            step = total.sub_(base32, alpha=sum(self.weights))
            return base32 + s.server_learning_rate * step
        if method == "fisher":
            fishers = self._statistics("fisher", name)
            function = get_method("fisher").function
            return function(
                tensors,
                None,
                statistics={"fisher": fishers},
                weight=examples,
                fisher_floor=s.fisher_floor,
                name=name,
            )
        if method == "regmean":
            grams = self._statistics("gram", name)
            if grams[0] is None:
                return _linear(tensors, examples)
            total = sum(examples)
            scaled = [g.to(torch.float64) * (n / total) for g, n in zip(grams, examples)]
            return get_method("regmean").function(
                tensors, None, statistics={"gram": scaled}, alpha=s.regmean_alpha, name=name
            )
        # ties, dare_ties, breadcrumbs over the updates theta_i - theta_g
        total = sum(examples)
        parameters: dict[str, Any] = {
            "weight": [n / total for n in examples],
            "density": s.density,
            "lambda_": s.scale,
            "normalize": True,
        }
        if method == "breadcrumbs":
            parameters["gamma"] = s.gamma
        if method == "dare_ties":
            parameters["generator"] = tensor_generator(s.seed, f"round {self.server_round}/{name}")
        merge_method = get_method(method)
        parameters["name"] = name
        accepted = {k: v for k, v in parameters.items() if k in merge_method.accepts}
        return merge_method.function(tensors, base.to(torch.float32), **accepted)

    def _statistics(self, kind: str, name: str) -> list[torch.Tensor | None]:
        if name not in self.statistics_names.get(kind, frozenset()):
            return [None] * len(self.kept)
        out: list[torch.Tensor | None] = []
        for update in self.kept:
            record = (update.fisher if kind == "fisher" else update.gram) or {}
            out.append(as_tensor(record[name]).to(torch.float32))
        return out


def _linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    return get_method("linear").function(tensors, None, weight=list(weights), normalize=normalize)


def _reject(
    update: ClientUpdate,
    reason: str,
    server_round: int,
    settings: AggregationSettings,
    skipped: list[SkippedClient],
) -> None:
    if settings.on_failure == "raise":
        raise DataError(
            f"round {server_round}: client {update.client} {reason}; fix the client, or set "
            "on-failure to skip to leave such clients out of the round"
        )
    skipped.append(SkippedClient(server_round, update.client, reason))


def _consistent_statistics(
    kept: list[ClientUpdate],
    kind: str,
    server_round: int,
    settings: AggregationSettings,
    skipped: list[SkippedClient],
) -> tuple[list[ClientUpdate], frozenset[str]]:
    """Keep the clients whose statistics cover the tensors most clients' cover."""
    if not kept:
        return kept, frozenset()
    sets = [frozenset((u.fisher if kind == "fisher" else u.gram) or ()) for u in kept]
    common = Counter(sets).most_common(1)[0][0]
    consistent = []
    for update, names in zip(kept, sets):
        if names == common:
            consistent.append(update)
            continue
        missing, extra = common - names, names - common
        reason = f"sent {kind} statistics for other tensors than the other clients"
        if missing:
            reason += f" (missing: {listed_names(missing)})"
        if extra:
            reason += f" (extra: {listed_names(extra)})"
        _reject(update, reason, server_round, settings, skipped)
    return consistent, common


def _residual_weights(
    kept: list[ClientUpdate], global_arrays: Mapping[str, Any], threshold: float
) -> list[float]:
    """``n_i * min(1, c * s / r_i)``: r_i the distance to the coordinate-wise median."""
    squares = [0.0] * len(kept)
    for name, value in global_arrays.items():
        if not is_floating(value):
            continue
        stacked = torch.stack([as_tensor(u.arrays[name]).to(torch.float32) for u in kept])
        ordered = stacked.sort(dim=0).values
        k = len(kept)
        if k % 2:
            median = ordered[k // 2]
        else:
            median = (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        for i in range(k):
            squares[i] += float(torch.sum((stacked[i] - median).to(torch.float64) ** 2))
    distances = [math.sqrt(v) for v in squares]
    scale = float(np.median(distances))
    weights = []
    for update, r in zip(kept, distances):
        factor = 1.0 if scale == 0.0 or r <= threshold * scale else threshold * scale / r
        weights.append(update.num_examples * factor)
    return weights


def _fisher_masses(kept: list[ClientUpdate], names: frozenset[str]) -> list[float]:
    masses = []
    for update in kept:
        record = update.fisher or {}
        total, count = 0.0, 0
        for name in sorted(names):
            f = as_tensor(record[name]).to(torch.float64)
            total += float(f.sum())
            count += f.numel()
        masses.append(total / max(count, 1))
    return masses


def _fedau_weights(
    kept: list[ClientUpdate],
    clients: Sequence[str],
    state: ServerState,
    settings: AggregationSettings,
) -> list[float]:
    """omega_i / N for each kept client, with the estimates from before this round; then
    the estimates are advanced (every known client's interval counter)."""
    known = list(dict.fromkeys([*clients, *(u.client for u in kept)]))
    n_clients = len(known)
    weights = []
    for update in kept:
        record = state.participation.setdefault(update.client, Participation())
        weights.append(record.weight / n_clients)
    participated = {u.client for u in kept}
    for client in known:
        record = state.participation.setdefault(client, Participation())
        record.elapsed += 1
        if client in participated or record.elapsed >= settings.participation_cutoff:
            if record.intervals == 0:
                record.weight = float(record.elapsed)
            else:
                record.weight = (record.intervals * record.weight + record.elapsed) / (
                    record.intervals + 1
                )
            record.intervals += 1
            record.elapsed = 0
    return weights


def prepare_round(
    global_arrays: Mapping[str, Any],
    updates: Sequence[ClientUpdate],
    settings: AggregationSettings,
    *,
    state: ServerState | None = None,
    server_round: int = 1,
    clients: Sequence[str] | None = None,
) -> RoundAggregation:
    """Check every reply, leave out (or refuse) the bad ones, and weigh the others.

    Parameters
    ----------
    global_arrays : mapping name -> array
        The global model the clients started the round from. Not modified.
    updates : sequence of ClientUpdate
        The clients' replies.
    settings : AggregationSettings
        The method and its settings (see :func:`modelfuse.federated.settings`).
    state : ServerState, optional
        The state carried between rounds (FedAvgM's momentum, FedAU's
        participation estimates); updated in place. A fresh one when omitted.
    server_round : int, default 1
        The round, for messages and DARE's seeds.
    clients : sequence of str, optional
        Every client that could have taken part in the round (FedAU counts
        the rounds each one missed; default: the ones that replied).

    Returns
    -------
    RoundAggregation
        Its :meth:`~RoundAggregation.tensors` merges the new global model.

    Raises
    ------
    DataError
        With ``on_failure="raise"``, the first bad reply, in one line naming
        the client and what is wrong.
    ConfigError
        The global model is empty.

    Examples
    --------
    >>> g = {"w": torch.zeros(2)}
    >>> a = ClientUpdate("a", {"w": torch.tensor([1.0, 2.0])}, num_examples=1)
    >>> b = ClientUpdate("b", {"w": torch.tensor([float("nan"), 0.0])}, num_examples=3)
    >>> prepared = prepare_round(g, [a, b], AggregationSettings())
    >>> [str(s) for s in prepared.skipped]
    ["round 1: client b skipped: tensor 'w' has 1 NaN or inf values of 2"]
    >>> dict(prepared.tensors())
    {'w': tensor([1., 2.])}
    """
    if len(global_arrays) == 0:
        raise ConfigError("global model: it has no tensors to aggregate")
    state = ServerState() if state is None else state
    aggregator = AGGREGATORS[settings.method]
    needs = aggregator.statistics(settings)
    kept: list[ClientUpdate] = []
    skipped: list[SkippedClient] = []
    for update in updates:
        reason = check_update(update, global_arrays, needs)
        if reason is None:
            kept.append(update)
        else:
            _reject(update, reason, server_round, settings, skipped)
    names: dict[str, frozenset[str]] = {}
    for kind in ("fisher", "gram"):
        if kind in needs:
            kept, names[kind] = _consistent_statistics(kept, kind, server_round, settings, skipped)
    weights = [float(u.num_examples) for u in kept]
    method = settings.method
    if kept and method == "uncertainty":
        if settings.uncertainty_source == "variance":
            weights = [u.num_examples / float(u.variance or 1.0) for u in kept]
        else:
            masses = _fisher_masses(kept, names["fisher"])
            weights = [u.num_examples * m for u, m in zip(kept, masses)]
            if sum(weights) <= 0:
                raise DataError(
                    f"round {server_round}: every client's Fisher diagonal is zero, so no "
                    "client can be weighted by its Fisher mass; check the clients' statistics "
                    "or set uncertainty-source to variance"
                )
    elif kept and method == "residual":
        weights = _residual_weights(kept, global_arrays, settings.residual_threshold)
    prepared = RoundAggregation(
        settings=settings,
        global_arrays=global_arrays,
        kept=kept,
        skipped=skipped,
        weights=weights,
        state=state,
        server_round=server_round,
        statistics_names=names,
    )
    if method == "fedau":
        prepared.weights = _fedau_weights(kept, list(clients or ()), state, settings)
    return prepared


def aggregate(
    global_arrays: Mapping[str, Any],
    updates: Sequence[ClientUpdate],
    settings: AggregationSettings,
    *,
    state: ServerState | None = None,
    server_round: int = 1,
    clients: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The next global model as a dict (see :func:`prepare_round` for the parameters).

    Returns the global model unchanged (copied) when every client was skipped.

    Examples
    --------
    >>> g = {"w": torch.zeros(2)}
    >>> a = ClientUpdate("a", {"w": torch.tensor([1.0, 2.0])}, num_examples=1)
    >>> b = ClientUpdate("b", {"w": torch.tensor([5.0, 6.0])}, num_examples=3)
    >>> aggregate(g, [a, b], AggregationSettings(method="linear"))
    {'w': tensor([4., 5.])}
    """
    prepared = prepare_round(
        global_arrays, updates, settings, state=state, server_round=server_round, clients=clients
    )
    if not prepared.kept:
        return {name: as_tensor(value).clone() for name, value in global_arrays.items()}
    return dict(prepared.tensors())
