"""What a federated round reads and keeps: client replies, skipped clients, server state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ClientUpdate", "Participation", "ServerState", "SkippedClient"]


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
