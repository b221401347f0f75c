"""sample_sign_sums against the sums written out in numpy."""

import numpy as np
import pytest
import torch

from modelfuse.inspection.sample_signs import sample_sign_sums

from ..merge._reference import top_k_positions


def _kept(tau: np.ndarray, k: int) -> np.ndarray:
    kept = np.zeros(tau.size, dtype=bool)
    kept[top_k_positions(np.abs(tau), k)] = True
    return kept & (tau != 0)


def _sums(taus, weights, overlap_k, conflict_k, consensus):
    sets = np.stack([_kept(t, k) for t, k in zip(taus, overlap_k)])
    shared = (sets[:, None, :] & sets[None, :, :]).sum(-1).astype(float)

    def elect(kept):
        x = np.stack([w * t * m for w, t, m in zip(weights, taus.astype(np.float64), kept)])
        tally = np.sign(x).sum(0) if consensus == "count" else x.sum(0)
        elected = np.where(tally >= 0, 1.0, -1.0)
        return (x != 0).sum(1), ((x != 0) & (np.sign(x) != elected)).sum(1)

    conflict = np.stack([_kept(t, k) for t, k in zip(taus, conflict_k)])
    return shared, elect(conflict), elect(sets)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize(
    ("overlap", "conflict"), [(0.2, 0.2), (0.2, 1.0), (0.3, 0.6), (1.0, 1.0)]
)
@pytest.mark.parametrize("tied", [False, True])
def test_sums_match_numpy(consensus, overlap, conflict, tied):
    g = torch.Generator().manual_seed(3)
    n = 40_000
    taus = torch.randn(3, n, generator=g)
    if tied:  # bfloat16 deltas: few distinct magnitudes
        taus = torch.round(taus * 8) / 8
    taus[1, :500] = 0.0
    weights = np.array([1.0, 0.5, -0.7]) if consensus == "sum" else np.ones(3)
    overlap_k = [max(1, int(overlap * n))] * 3
    conflict_k = [max(1, int(conflict * n))] * 3
    found = sample_sign_sums(taus, weights, overlap_k, conflict_k, consensus)
    shared, (nonzero, dropped), (t_nonzero, t_dropped) = _sums(
        taus.numpy(), weights, overlap_k, conflict_k, consensus
    )
    np.testing.assert_array_equal(found.shared, shared)
    np.testing.assert_array_equal(found.nonzero, nonzero)
    np.testing.assert_array_equal(found.dropped, dropped)
    if overlap == conflict:
        assert found.trimmed_nonzero is None and found.trimmed_dropped is None
    else:
        np.testing.assert_array_equal(found.trimmed_nonzero, t_nonzero)
        np.testing.assert_array_equal(found.trimmed_dropped, t_dropped)
