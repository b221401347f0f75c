"""report.md links the PNGs beside it; report.html embeds them and stands alone."""

import base64
import re

import numpy as np
import pytest

from modelfuse.errors import DataError, OutputError
from modelfuse.evaluation import compare_predictions
from modelfuse.report import Section, forest_plot, write_comparison_report, write_report


def test_markdown_and_self_contained_html(tmp_path):
    forest_plot(["a"], [0.5], [(0.4, 0.6)], tmp_path / "f.png")
    sections = [
        Section("Results", ("x < y & z",), table=(["m", "v"], [["a", 0.5]]),
                images=(("f.png", "the forest"),), preformatted="modelfuse compare ..."),
        Section("More", ("second",)),
    ]
    md, page = write_report(tmp_path, "My <report>", sections)
    text = md.read_text()
    assert text.startswith("# My <report>\n")
    assert "## Results" in text and "## More" in text
    assert "| m   |   v |" in text
    assert "![the forest](f.png)" in text
    assert "```\nmodelfuse compare ...\n```" in text
    html = page.read_text()
    assert "<title>My &lt;report&gt;</title>" in html
    assert "x &lt; y &amp; z" in html
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(encoded) == (tmp_path / "f.png").read_bytes()
    assert 'src="f.png"' not in html  # nothing refers to files beside it


def test_missing_image_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        write_report(tmp_path, "t", [Section("s", images=(("nope.png", "c"),))])
    with pytest.raises(OutputError, match="not a folder"):
        write_report(tmp_path / "absent", "t", [Section("s")])


def _comparison(k, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    preds = {
        f"m{j}": np.eye(2)[np.where(rng.random(300) < 0.6 + 0.1 * j, y, 1 - y)]
        for j in range(k)
    }
    return compare_predictions(preds, y, n_resamples=200)


def test_comparison_report_with_three_candidates_has_a_cd_diagram(tmp_path):
    written = write_comparison_report(_comparison(3), tmp_path, command="modelfuse compare x")
    names = sorted(p.name for p in written)
    assert names == ["critical_difference.png", "differences.png", "forest.png", "report.html",
                     "report.md", "results.json"]
    text = (tmp_path / "report.md").read_text()
    assert "## Ranking" in text and "critical_difference.png" in text
    assert "m0 (reference)" in text and "Holm" in text
    assert text.count("data:image") == 0
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3


def test_comparison_report_with_two_candidates_has_no_cd_diagram(tmp_path):
    written = write_comparison_report(_comparison(2), tmp_path, html_report=False)
    assert sorted(p.name for p in written) == ["differences.png", "forest.png", "report.md",
                                               "results.json"]
    assert "Ranking" not in (tmp_path / "report.md").read_text()


def test_comparison_report_creates_its_folder_and_refuses_a_file(tmp_path):
    target = tmp_path / "a" / "b"
    written = write_comparison_report(_comparison(2), target, html_report=False)
    assert all(p.parent == target for p in written)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the report folder"):
        write_comparison_report(_comparison(2), blocker)
    assert blocker.read_text() == "x"
