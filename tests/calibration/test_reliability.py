"""The reliability diagram writes one PNG and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from modelfuse.calibration.reliability import reliability_diagram


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_reliability_diagram_writes_a_png(tmp_path: Path, binning: str) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=500)
    labels = rng.integers(0, 4, size=500)
    out = reliability_diagram(probs, labels, tmp_path / "r.png", n_bins=10, binning=binning)
    assert out == tmp_path / "r.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.shape[0] > image.shape[1] > 300  # portrait: diagram above histogram
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]  # no temporary left


def test_reliability_diagram_rejects_bad_probabilities(tmp_path: Path) -> None:
    from modelfuse.errors import DataError

    with pytest.raises(DataError, match="sum to 1"):
        reliability_diagram(np.full((3, 2), 0.4), np.array([0, 1, 0]), tmp_path / "r.png")
    assert not any(tmp_path.iterdir())
