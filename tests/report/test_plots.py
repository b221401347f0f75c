"""Figures: PNG files written through matplotlib.figure.Figure, cliques of the CD diagram."""

import numpy as np
import pytest
from matplotlib import image as mpimg

from modelfuse.errors import DataError, OutputError
from modelfuse.report import critical_difference_diagram, forest_plot, significance_cliques


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forest_plot_writes_a_png_without_pyplot(tmp_path):
    import sys

    out = forest_plot(["a", "b", "c"], [0.1, 0.0, -0.2], [(0.0, 0.2), (-0.1, 0.1), (-0.3, -0.1)],
                      tmp_path / "forest.png", reference_value=0.0, xlabel="diff", title="t")
    assert out == tmp_path / "forest.png" and _is_png(out)
    pixels = mpimg.imread(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    # the figure is not left registered in pyplot's global state
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_forest_plot_height_grows_with_rows(tmp_path):
    few = mpimg.imread(forest_plot(["a"], [0.5], [(0.4, 0.6)], tmp_path / "one.png"))
    many = mpimg.imread(
        forest_plot([str(i) for i in range(12)], [0.5] * 12, [(0.4, 0.6)] * 12,
                    tmp_path / "many.png")
    )
    assert many.shape[0] > few.shape[0]


def test_forest_plot_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(DataError, match="2 names, 1 estimates"):
        forest_plot(["a", "b"], [0.5], [(0.4, 0.6)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_unwritable_target_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        forest_plot(["a"], [0.5], [(0.4, 0.6)], tmp_path / "missing" / "x.png")


def test_significance_cliques_hand_worked():
    # CD 1.0: 1.0-1.8 within, 1.8-2.5 within, 2.5-3.4 within, 1.0-2.5 not
    assert significance_cliques([1.0, 1.8, 2.5, 3.4], 1.0) == [(0, 1), (1, 2), (2, 3)]
    assert significance_cliques([1.0, 1.2, 1.4, 4.0], 0.5) == [(0, 2)]
    assert significance_cliques([1.0, 3.0, 5.0], 0.5) == []
    assert significance_cliques([1.0, 1.1, 1.2], 5.0) == [(0, 2)]


def test_critical_difference_diagram(tmp_path):
    ranks = {"soup": 1.4, "ties": 2.2, "dare": 2.9, "base": 3.5}
    out = critical_difference_diagram(ranks, 0.9, tmp_path / "cd.png", title="cd")
    assert _is_png(out)
    assert mpimg.imread(out).shape[1] > 500
    with pytest.raises(DataError, match="at least 2"):
        critical_difference_diagram({"a": 1.0}, 0.5, tmp_path / "bad.png")


def test_plots_accept_numpy_inputs(tmp_path):
    out = forest_plot(np.array(["x", "y"]), np.array([1.0, 2.0]),
                      np.array([[0.5, 1.5], [1.5, 2.5]]), tmp_path / "np.png")
    assert _is_png(out)
