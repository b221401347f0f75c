"""Splitting a labelled data set over federated clients: the Dirichlet non-IID partition.

Each class's examples are shared among the clients in proportions drawn from
a symmetric Dirichlet distribution: a small concentration gives each client a
few dominant classes (strongly non-IID), a large one gives every client
about the same class mix (close to IID). Each client's share is then split
into its own training, validation and held-out parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelfuse.errors import ConfigError, DataError

__all__ = ["ClientIndices", "client_parts", "dirichlet_partition"]

_MAX_DRAWS = 1000
"""Draws tried before a partition leaving every client at least ``min_size`` examples is given up."""


def dirichlet_partition(
    labels: np.ndarray,
    n_clients: int,
    concentration: float,
    *,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    r"""Share the examples among ``n_clients`` by class, in Dirichlet-distributed proportions.

    For every class :math:`c`, proportions :math:`p_c \sim \mathrm{Dir}(\alpha
    \mathbf{1}_K)` over the :math:`K` clients are drawn and the class's
    examples (in a seeded random order) are cut at the cumulative proportions,
    so client :math:`k` receives :math:`\lfloor n_c \sum_{j \le k} p_{cj}
    \rceil - \lfloor n_c \sum_{j < k} p_{cj} \rceil` of them. The whole draw
    is repeated (from the same generator) until every client has at least
    ``min_size`` examples, as in Hsu, Qi and Brown (arXiv:1909.06335) and
    Li et al., "Federated learning on non-IID data silos" (ICDE 2022).

    Parameters
    ----------
    labels : array of shape (n,)
        Integer class labels. Not modified.
    n_clients : int
        K, at least 1.
    concentration : float
        :math:`\alpha > 0`: 0.3 is strongly non-IID, 10 close to IID.
    seed : int
        Fixes the proportions and the order within each class.
    min_size : int, default 1
        The fewest examples a client may receive (at least 1: no client is empty).

    Returns
    -------
    list of arrays
        Client ``k``'s example indices, sorted; together a partition of ``range(n)``.

    Raises
    ------
    ConfigError
        A bad ``n_clients``, ``concentration`` or ``min_size``, or no draw in
        1,000 gives every client ``min_size`` examples.

    Examples
    --------
    >>> labels = np.repeat(np.arange(3), 20)
    >>> parts = dirichlet_partition(labels, 4, 0.5, seed=0, min_size=5)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(60))
    True
    >>> min(len(p) for p in parts) >= 5
    True
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"labels: expected a 1-D array of integer class labels, got shape {y.shape} "
            f"of dtype {y.dtype}"
        )
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ConfigError(
            f"n_clients: expected an integer of at least 1, got {repr(n_clients)[:60]}"
        )
    if not (isinstance(concentration, (int, float)) and np.isfinite(concentration)) or not (
        concentration > 0
    ):
        raise ConfigError(
            f"concentration: expected a finite number above 0, got {repr(concentration)[:60]}"
        )
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"min_size: expected an integer of at least 1, got {repr(min_size)[:60]}")
    if min_size * n_clients > len(y):
        raise ConfigError(
            f"min_size: {min_size} examples for each of {n_clients} clients needs "
            f"{min_size * n_clients}, but there are {len(y)}; lower min_size or n_clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    for _ in range(_MAX_DRAWS):
        shares: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for index in members:
            order = rng.permutation(index)
            proportions = rng.dirichlet(np.full(n_clients, float(concentration)))
            cuts = np.rint(np.cumsum(proportions)[:-1] * len(order)).astype(int)
            for k, part in enumerate(np.split(order, cuts)):
                shares[k].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(
        f"min_size: no Dirichlet draw in {_MAX_DRAWS} (concentration {concentration:g}, "
        f"{n_clients} clients, {len(y)} examples) gives every client {min_size} examples; "
        "lower min_size or raise the concentration"
    )


@dataclass(frozen=True)
class ClientIndices:
    """One client's training, validation and held-out example indices (disjoint)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def client_parts(
    indices: np.ndarray,
    *,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> ClientIndices:
    """Split one client's examples at random into training, validation and held-out parts.

    The validation and held-out parts get ``round(fraction * n)`` examples,
    at least one each; the rest is for training (at least one).

    Examples
    --------
    >>> parts = client_parts(np.arange(10), seed=0)
    >>> len(parts.train), len(parts.val), len(parts.test)
    (6, 2, 2)
    """
    index = np.asarray(indices)
    n = len(index)
    if n < 3:
        raise DataError(
            f"indices: a client needs at least 3 examples for its training, validation and "
            f"held-out parts, got {n}; raise min_size of the partition"
        )
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name}: expected a value in (0, 1), got {repr(value)[:60]}")
    n_val = max(1, int(round(val_fraction * n)))
    n_test = max(1, int(round(test_fraction * n)))
    if n_val + n_test >= n:
        raise ConfigError(
            f"val_fraction, test_fraction: {n_val} + {n_test} of {n} examples leave none for "
            "training; lower the fractions"
        )
    order = np.random.default_rng(seed).permutation(index)
    return ClientIndices(
        train=np.sort(order[n_val + n_test :]),
        val=np.sort(order[:n_val]),
        test=np.sort(order[n_val : n_val + n_test]),
    )
