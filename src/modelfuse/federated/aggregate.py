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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelfuse.errors import ConfigError, DataError
from modelfuse.federated.settings import AggregationSettings
from modelfuse.merge.execute import tensor_generator
from modelfuse.merge.parameters import short
from modelfuse.merge.registry import get_method

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ClientUpdate",
    "Participation",
    "RoundAggregation",
    "ServerState",
    "SkippedClient",
    "aggregate",
    "prepare_round",
]

_LISTED = 5
"""Names listed in a message; the others are counted."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a training round.

    Attributes
    ----------
    client : str
        The client's name in messages and in participation statistics (a
        Flower node id).
    arrays : mapping name -> array
        The client's model after local training: torch tensors, NumPy arrays or
        Flower ``Array`` objects (read with ``.numpy()`` one at a time). Not modified.
    num_examples : float
        The number of examples it trained on (FedAvg's weight).
    fisher : mapping name -> array, optional
        Its diagonal Fisher, keyed like ``arrays`` (``fisher``, and
        ``uncertainty`` from Fisher mass).
    gram : mapping name -> array, optional
        Gram matrices of its linear layers' inputs, keyed by the weights' names
        (``regmean``).
    variance : float, optional
        The estimated variance of its update (``uncertainty``; see
        :func:`modelfuse.federated.trajectory_variance`).
    """

    client: str
    arrays: Mapping[str, Any]
    num_examples: float
    fisher: Mapping[str, Any] | None = None
    gram: Mapping[str, Any] | None = None
    variance: float | None = None


@dataclass(frozen=True)
class SkippedClient:
    """A client left out of a round, and why."""

    server_round: int
    client: str
    reason: str

    def __str__(self) -> str:
        return f"round {self.server_round}: client {self.client} skipped: {self.reason}"


@dataclass
class Participation:
    """FedAU's running estimate of one client's participation interval.

    ``weight`` is the estimate :math:`\\omega` of the mean interval between
    participations (1 before any interval completed); ``intervals`` the number
    of completed intervals; ``elapsed`` the rounds since the last one.
    """

    weight: float = 1.0
    intervals: int = 0
    elapsed: int = 0


@dataclass
class ServerState:
    """What an aggregation carries from one round to the next.

    Attributes
    ----------
    momentum : dict name -> Tensor
        FedAvgM's momentum buffer (empty before the first round).
    participation : dict client -> Participation
        FedAU's per-client estimates.
    """

    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    participation: dict[str, Participation] = field(default_factory=dict)


def _tensor(value: Any) -> torch.Tensor:
    """A torch view (or the tensor itself) of a tensor, a NumPy array or a Flower ``Array``."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if hasattr(value, "numpy"):
        return torch.from_numpy(np.asarray(value.numpy()))
    return torch.as_tensor(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def _names(names: Sequence[str] | set[str]) -> str:
    ordered = sorted(names)
    listed = ", ".join(short(n) for n in ordered[:_LISTED])
    more = f" and {len(ordered) - _LISTED} more" if len(ordered) > _LISTED else ""
    return listed + more


def _floating(value: Any) -> bool:
    dtype = value.dtype
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.dtype(dtype).kind == "f"


@dataclass(frozen=True)
class Aggregator:
    """A registered aggregation.

    Attributes
    ----------
    name : str
        Its name in settings.
    summary : str
        One line for tables and messages.
    statistics : callable
        ``statistics(settings) -> tuple of str``: what each client must send
        (``"fisher"``, ``"gram"``, ``"variance"``).
    reference : str
        The paper.
    """

    name: str
    summary: str
    statistics: Callable[[AggregationSettings], tuple[str, ...]]
    reference: str


def _none(_settings: AggregationSettings) -> tuple[str, ...]:
    return ()


def _uncertainty_statistics(settings: AggregationSettings) -> tuple[str, ...]:
    return ("variance",) if settings.uncertainty_source == "variance" else ("fisher",)


AGGREGATORS: dict[str, Aggregator] = {
    "linear": Aggregator(
        "linear",
        "FedAvg: the clients' models averaged with weights n_i (their example counts)",
        _none,
        "McMahan et al., Communication-efficient learning of deep networks from "
        "decentralized data, AISTATS 2017",
    ),
    "fedavgm": Aggregator(
        "fedavgm",
        "FedAvgM: server momentum on the pseudo-gradient theta_g - FedAvg",
        _none,
        "Hsu, Qi and Brown, Measuring the effects of non-identical data distribution for "
        "federated visual classification, arXiv:1909.06335, 2019",
    ),
    "fedau": Aggregator(
        "fedau",
        "FedAU: updates weighted by each client's estimated participation interval",
        _none,
        "Wang and Ji, A lightweight method for tackling unknown participation statistics in "
        "federated averaging, ICLR 2024",
    ),
    "ties": Aggregator(
        "ties",
        "TIES over the clients' updates: trim, elect signs, disjoint mean",
        _none,
        "Yadav et al., TIES-Merging: resolving interference when merging models, NeurIPS 2023",
    ),
    "dare_ties": Aggregator(
        "dare_ties",
        "DARE over the clients' updates: random drop and rescale, then TIES' election",
        _none,
        "Yu et al., Language models are super Mario: absorbing abilities from homologous "
        "models as a free lunch, ICML 2024",
    ),
    "breadcrumbs": Aggregator(
        "breadcrumbs",
        "model breadcrumbs over the clients' updates: drop the largest and smallest entries",
        _none,
        "Davari and Belilovsky, Model breadcrumbs: scaling multi-task model merging with "
        "sparse masks, ECCV 2024",
    ),
    "fisher": Aggregator(
        "fisher",
        "Fisher-weighted average, lambda_i = n_i (clients send diagonal Fisher)",
        lambda _s: ("fisher",),
        "Matena and Raffel, Merging models with Fisher-weighted averaging, NeurIPS 2022",
    ),
    "regmean": Aggregator(
        "regmean",
        "RegMean on linear layers with Gram matrices weighted by n_i (clients send Grams)",
        lambda _s: ("gram",),
        "Jin et al., Dataless knowledge fusion by merging weights of language models, ICLR 2023",
    ),
    "uncertainty": Aggregator(
        "uncertainty",
        "weights n_i / variance_i (reported) or n_i * mean Fisher_i (precision-weighted)",
        _uncertainty_statistics,
        "Reyes et al., Precision-weighted federated learning, arXiv:2107.09627, 2021",
    ),
    "residual": Aggregator(
        "residual",
        "weights n_i, cut (Huber) for clients far from the coordinate-wise median",
        _none,
        "Fu et al., Attack-resistant federated learning with residual-based reweighting, "
        "arXiv:1912.11464, 2019",
    ),
}
"""Every aggregation, by the name used in :class:`AggregationSettings`."""


def _check_statistics(
    update: ClientUpdate,
    kind: str,
    record: Mapping[str, Any] | None,
    global_arrays: Mapping[str, Any],
) -> str | None:
    if record is None or len(record) == 0:
        return f"sent no {kind} statistics, which the method reads; compute them on the client"
    unknown = [name for name in record if name not in global_arrays]
    if unknown:
        return f"sent {kind} statistics for tensors the global model has not: {_names(unknown)}"
    for name, value in record.items():
        target = _shape(global_arrays[name])
        if kind == "fisher":
            expected = target
        else:
            if len(target) != 2:
                return (
                    f"sent a Gram matrix for tensor {short(name)} of shape {list(target)}; "
                    "Gram matrices belong to 2-D linear weights"
                )
            expected = (target[1], target[1])
        if _shape(value) != expected:
            return (
                f"{kind} of tensor {short(name)} has shape {list(_shape(value))}, "
                f"expected {list(expected)}"
            )
        tensor = _tensor(value)
        if tuple(tensor.shape) != expected:
            return f"{kind} of tensor {short(name)} holds data of another shape than it declares"
        if not tensor.dtype.is_floating_point:
            return f"{kind} of tensor {short(name)} has dtype {tensor.dtype}, expected floats"
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"{kind} of tensor {short(name)} has {bad} NaN or inf values"
        if kind == "fisher" and tensor.numel() and float(tensor.min()) < 0:
            return f"fisher of tensor {short(name)} has negative entries"
    return None


def _check_update(
    update: ClientUpdate,
    global_arrays: Mapping[str, Any],
    needs: tuple[str, ...],
) -> str | None:
    """Why this reply cannot be aggregated, or None. Reads one tensor at a time."""
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"reported {short(n)} examples; expected a positive number"
    missing = [name for name in global_arrays if name not in update.arrays]
    if missing:
        return f"misses tensors of the global model: {_names(missing)}"
    extra = [name for name in update.arrays if name not in global_arrays]
    if extra:
        return f"sent tensors the global model has not: {_names(extra)}"
    for name, value in update.arrays.items():
        expected = _shape(global_arrays[name])
        if _shape(value) != expected:
            return (
                f"tensor {short(name)} has shape {list(_shape(value))}, "
                f"the global model's has {list(expected)}"
            )
        tensor = _tensor(value)
        if tuple(tensor.shape) != expected:
            return f"tensor {short(name)} holds data of another shape than it declares"
        if _floating(global_arrays[name]) and not tensor.dtype.is_floating_point:
            return f"tensor {short(name)} has dtype {tensor.dtype}, expected floats"
        if tensor.dtype.is_floating_point:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return f"tensor {short(name)} has {bad} NaN or inf values of {tensor.numel()}"
    if "variance" in needs:
        v = update.variance
        if v is None:
            return "reported no update variance, which the method reads; compute it on the client"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"reported an update variance of {short(v)}; expected a positive number"
    for kind in ("fisher", "gram"):
        if kind in needs:
            record = update.fisher if kind == "fisher" else update.gram
            reason = _check_statistics(update, kind, record, global_arrays)
            if reason is not None:
                return reason
    return None


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
                base = _tensor(global_value)
                tensors = [_tensor(update.arrays[name]) for update in self.kept]
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
            out.append(_tensor(record[name]).to(torch.float32))
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
            reason += f" (missing: {_names(missing)})"
        if extra:
            reason += f" (extra: {_names(extra)})"
        _reject(update, reason, server_round, settings, skipped)
    return consistent, common


def _residual_weights(
    kept: list[ClientUpdate], global_arrays: Mapping[str, Any], threshold: float
) -> list[float]:
    """``n_i * min(1, c * s / r_i)``: r_i the distance to the coordinate-wise median."""
    squares = [0.0] * len(kept)
    for name, value in global_arrays.items():
        if not _floating(value):
            continue
        stacked = torch.stack([_tensor(u.arrays[name]).to(torch.float32) for u in kept])
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
            f = _tensor(record[name]).to(torch.float64)
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
        reason = _check_update(update, global_arrays, needs)
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
        return {name: _tensor(value).clone() for name, value in global_arrays.items()}
    return dict(prepared.tensors())
