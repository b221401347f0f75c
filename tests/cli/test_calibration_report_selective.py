"""``modelfuse calibration-report --risk-coverage --conformal ALPHA``: results and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelfuse.calibration import ConformalClassifier, average_set_size, empirical_coverage
from modelfuse.cli import main
from modelfuse.evaluation import risk_coverage_curve


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=400)
    labels = (rng.uniform(size=(400, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, 2)
    paths = {"p": tmp_path / "p.npy", "flat": tmp_path / "flat.npy", "y": tmp_path / "y.npy"}
    np.save(paths["p"], probs)
    np.save(paths["flat"], 0.5 * probs + 0.5 / 3)
    np.save(paths["y"], labels)
    return paths


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    return lines[0]


def _snapshot(paths: dict[str, Path]) -> dict[str, tuple[bytes, int]]:
    return {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in paths.items()}


def test_report_with_risk_coverage_and_conformal(files, tmp_path, capsys) -> None:
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(files["y"]), "-o", str(out)]
    code = main([*argv, "--risk-coverage", "--conformal", "0.2", "--seed", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "aurc" in printed and "e_aurc" in printed and "calibrated on 200 samples" in printed
    assert sorted(f.name for f in out.iterdir()) == [
        "metrics.json",
        "metrics.md",
        "reliability.png",
        "risk-coverage.png",
    ]
    assert (out / "risk-coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "metrics.json").read_text())
    p, y = np.load(files["p"]), np.load(files["y"])
    curve = risk_coverage_curve(p.max(axis=1), p.argmax(axis=1) == y)
    assert summary["metrics"]["p"]["aurc"] == pytest.approx(curve.aurc)
    assert summary["metrics"]["p"]["e_aurc"] == pytest.approx(curve.e_aurc)
    conformal = summary["conformal"]
    assert (conformal["alpha"], conformal["seed"]) == (0.2, 5)
    assert (conformal["n_calibration"], conformal["n_test"]) == (200, 200)
    # the documented split: the first floor(n/2) of a permutation seeded by --seed
    order = np.random.default_rng(5).permutation(400)
    cal, test = order[:200], order[200:]
    rows = {r["method"]: r for r in conformal["rows"]}
    assert set(rows) == {"lac", "aps", "raps", "lac-mondrian"}
    for label, row in rows.items():
        model = ConformalClassifier(
            label.removesuffix("-mondrian"), alpha=0.2, class_conditional=label == "lac-mondrian"
        )
        sets = model.fit(p[cal], y[cal]).predict_sets(p[test])
        assert row["coverage"] == pytest.approx(empirical_coverage(sets, y[test]))
        assert row["mean_set_size"] == pytest.approx(average_set_size(sets))
        per_class = empirical_coverage(sets, y[test], per_class=True)
        assert row["worst_class_coverage"] == pytest.approx(np.nanmin(per_class))
    markdown = (out / "metrics.md").read_text()
    assert "## Conformal prediction sets" in markdown and "![risk-coverage curves]" in markdown


def test_report_without_the_new_options_is_unchanged(files, tmp_path, capsys) -> None:
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(files["y"]), "-o", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert (
        capsys.readouterr().out.strip() == f"wrote {out}/metrics.md, metrics.json, reliability.png"
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert "conformal" not in summary and "aurc" not in summary["metrics"]["p"]


def test_several_inputs_share_one_plot_and_split(files, tmp_path, capsys) -> None:
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), str(files["flat"]), "-y", str(files["y"])]
    assert main([*argv, "-o", str(out), "--risk-coverage", "--conformal", "0.1", "--quiet"]) == 0
    assert "risk-coverage.png" in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    # a monotone transform of the confidences ranks the samples alike: same AURC
    assert summary["metrics"]["flat"]["aurc"] == pytest.approx(summary["metrics"]["p"]["aurc"])
    lac = {r["input"]: r for r in summary["conformal"]["rows"] if r["method"] == "lac"}
    assert lac["flat"]["coverage"] == pytest.approx(lac["p"]["coverage"])


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("1", "1"), ("1.5", "1.5"), ("-0.1", "-0.1"), ("nan", ""), ("abc", "abc")],
)
def test_bad_conformal_alpha_is_a_usage_error(files, tmp_path, capsys, value, shown) -> None:
    before = _snapshot(files)
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(files["y"]), "-o", str(out)]
    assert main([*argv, "--conformal", value]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--conformal" in err and shown in err
    assert not out.exists() and _snapshot(files) == before


def test_conformal_alpha_too_small_for_the_calibration_half(files, tmp_path, capsys) -> None:
    before = _snapshot(files)
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(files["y"]), "-o", str(out)]
    assert main([*argv, "--conformal", "0.001"]) == 2
    line = _error_line(capsys)
    assert line == (
        "modelfuse: error: --conformal 0.001: the calibration half holds 200 of the 400 "
        "samples, and alpha = 0.001 needs at least 1/alpha - 1 = 999; pass a larger "
        "--conformal or more samples"
    )
    assert not out.exists() and _snapshot(files) == before


def test_bad_seed_is_a_usage_error(files, tmp_path, capsys) -> None:
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(files["y"]), "-o", str(out)]
    assert main([*argv, "--conformal", "0.1", "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not out.exists()


def test_bad_labels_with_the_new_options_write_nothing(files, tmp_path, capsys) -> None:
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=int))
    before = _snapshot(files)
    out = tmp_path / "r"
    argv = ["calibration-report", "-p", str(files["p"]), "-y", str(tmp_path / "short.npy")]
    assert main([*argv, "-o", str(out), "--risk-coverage", "--conformal", "0.1"]) == 2
    assert "short.npy" in _error_line(capsys)
    assert not out.exists() and _snapshot(files) == before
