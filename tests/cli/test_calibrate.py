"""``modelfuse calibrate`` and ``modelfuse calibration-report``: results and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelfuse.calibration import (
    TemperatureScaling,
    brier_score,
    expected_calibration_error,
    make_calibrator,
    negative_log_likelihood,
)
from modelfuse.cli import main

RUN = [
    sys.executable,
    "-c",
    "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))",
]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(2000, 3))
    probs = _softmax(logits / 2.0)
    labels = (rng.uniform(size=(2000, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, 2)
    paths = {
        "val": tmp_path / "val.npy",
        "val_y": tmp_path / "val_y.npy",
        "test": tmp_path / "test.npy",
        "probs": tmp_path / "p.npy",
    }
    np.save(paths["val"], logits[:1000])
    np.save(paths["val_y"], labels[:1000])
    np.save(paths["test"], logits[1000:])
    np.save(paths["probs"], _softmax(logits[1000:]))
    paths["test_y"] = tmp_path / "test_y.npy"
    np.save(paths["test_y"], labels[1000:])
    return paths


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelfuse: error: ")
    assert "\n" not in err
    return err


def test_temperature_fit_and_apply_match_the_library(files, tmp_path, capsys) -> None:
    cal = tmp_path / "CAL.json"
    argv = ["calibrate", "--scores", str(files["val"]), "--labels", str(files["val_y"]),
            "--method", "temperature", "-o", str(cal)]  # fmt: skip
    assert main(argv) == 0
    assert "temperature:" in capsys.readouterr().out
    reference = TemperatureScaling().fit(np.load(files["val"]), np.load(files["val_y"]))
    saved = json.loads(cal.read_text())
    assert saved["method"] == "temperature"
    out = tmp_path / "cal_test.npy"
    code = main(["calibrate", "--apply", str(cal), "--scores", str(files["test"]), "-o", str(out)])
    assert code == 0
    np.testing.assert_allclose(np.load(out), reference.predict_proba(np.load(files["test"])))


@pytest.mark.parametrize("method", ["vector", "matrix", "platt", "isotonic", "histogram"])
def test_every_method_through_the_cli(files, tmp_path, method: str) -> None:
    cal = tmp_path / "CAL.json"
    argv = ["calibrate", "-s", str(files["val"]), "-y", str(files["val_y"]), "--method", method,
            "-o", str(cal)]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "o.npy"
    assert main(["calibrate", "--apply", str(cal), "-s", str(files["test"]), "-o", str(out)]) == 0
    reference = make_calibrator(method, kind="logits")
    reference.fit(np.load(files["val"]), np.load(files["val_y"]))
    np.testing.assert_allclose(np.load(out), reference.predict_proba(np.load(files["test"])))


def test_calibration_report_writes_table_files_and_diagram(files, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["calibration-report", "--probabilities", str(files["probs"]), "--labels",
            str(files["test_y"]), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["metrics.json", "metrics.md", "reliability.png"]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    probs, labels = np.load(files["probs"]), np.load(files["test_y"])
    assert metrics["ece (15 uniform bins)"] == pytest.approx(
        expected_calibration_error(probs, labels)
    )
    assert metrics["nll"] == pytest.approx(negative_log_likelihood(probs, labels))
    assert metrics["brier"] == pytest.approx(brier_score(probs, labels))
    assert metrics["mce"] == pytest.approx(expected_calibration_error(probs, labels, norm="max"))
    assert f"{metrics['nll']:.4f}" in printed
    assert "| ace (equal-mass bins) |" in (out / "metrics.md").read_text()
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_calibration_report_is_kept_without_overwrite_and_replaced_with_it(
    files, tmp_path, capsys
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    argv = ["calibration-report", "-p", str(files["probs"]), "-y", str(files["test_y"]), "-o",
            str(out)]  # fmt: skip
    assert main(argv) == 2
    assert f"{out}: already exists; remove it, choose another -o, or pass --overwrite" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "metrics.md", "reliability.png"
    ]  # fmt: skip
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_subprocess_end_to_end(files, tmp_path) -> None:
    cal = tmp_path / "CAL.json"
    done = subprocess.run(
        [*RUN, "calibrate", "--scores", str(files["val"]), "--labels", str(files["val_y"]),
         "--method", "temperature", "-o", str(cal)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cal.is_file()
    helped = subprocess.run([*RUN, "calibration-report", "--help"], capture_output=True, text=True)
    assert "modelfuse calibration-report --probabilities p.npy" in helped.stdout


# ----- bad input: one test each; exit code 2, the file named, nothing written -----


def _bad(tmp_path, capsys, argv, named, what: str) -> None:
    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    err = _error_line(capsys)
    assert str(named) in err, err
    assert what in err, err
    assert set(tmp_path.iterdir()) == before


def _fit(scores, labels, tmp_path):
    return ["calibrate", "--scores", str(scores), "--labels", str(labels), "-o",
            str(tmp_path / "CAL.json")]  # fmt: skip


def test_bad_unknown_method(files, tmp_path, capsys) -> None:
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "beta"]
    _bad(tmp_path, capsys, argv, "--method",
         "--method: unknown 'beta'; expected one of temperature, vector, matrix, platt, "
         "isotonic, histogram")  # fmt: skip


def test_bad_single_class_in_the_calibration_set(files, tmp_path, capsys) -> None:
    y = tmp_path / "one_class.npy"
    np.save(y, np.ones(1000, dtype=int))
    _bad(tmp_path, capsys, _fit(files["val"], y, tmp_path), y, "only class 1")


def test_bad_labels_of_another_length(files, tmp_path, capsys) -> None:
    y = tmp_path / "short_y.npy"
    np.save(y, np.load(files["val_y"])[:10])
    _bad(tmp_path, capsys, _fit(files["val"], y, tmp_path), y, "10 labels for 1000")


def test_bad_labels_outside_the_class_range(files, tmp_path, capsys) -> None:
    y = tmp_path / "range_y.npy"
    labels = np.load(files["val_y"])
    labels[0] = -1
    np.save(y, labels)
    _bad(tmp_path, capsys, _fit(files["val"], y, tmp_path), y, "labels must lie")


def test_bad_nan_scores(files, tmp_path, capsys) -> None:
    s = tmp_path / "nan.npy"
    z = np.load(files["val"])
    z[3, 2] = np.nan
    np.save(s, z)
    _bad(tmp_path, capsys, _fit(s, files["val_y"], tmp_path), s, "NaN")


def test_bad_inf_scores(files, tmp_path, capsys) -> None:
    s = tmp_path / "inf.npy"
    z = np.load(files["val"])
    z[7, 0] = -np.inf
    np.save(s, z)
    _bad(tmp_path, capsys, _fit(s, files["val_y"], tmp_path), s, "inf")


def test_bad_empty_scores(files, tmp_path, capsys) -> None:
    s = tmp_path / "empty.npy"
    np.save(s, np.zeros((0, 3)))
    _bad(tmp_path, capsys, _fit(s, files["val_y"], tmp_path), s, "empty")


def test_bad_probabilities_that_do_not_sum_to_one(files, tmp_path, capsys) -> None:
    s = tmp_path / "p.npy"
    np.save(s, np.full((1000, 3), 0.5))
    argv = [*_fit(s, files["val_y"], tmp_path), "--kind", "probabilities"]
    _bad(tmp_path, capsys, argv, s, "sum to 1")


def test_bad_apply_to_another_number_of_classes(files, tmp_path, capsys) -> None:
    assert main(_fit(files["val"], files["val_y"], tmp_path)) == 0
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((5, 4)))
    capsys.readouterr()
    argv = ["calibrate", "--apply", str(tmp_path / "CAL.json"), "--scores", str(wide), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, wide, "4 classes")


def test_bad_report_probabilities_that_do_not_sum_to_one(files, tmp_path, capsys) -> None:
    p = tmp_path / "bad_p.npy"
    np.save(p, np.full((1000, 3), 0.2))
    argv = ["calibration-report", "-p", str(p), "-y", str(files["test_y"]), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, p, "sum to 1")


def test_bad_report_labels_of_another_length(files, tmp_path, capsys) -> None:
    y = tmp_path / "short_y.npy"
    np.save(y, np.zeros(3, dtype=int))
    argv = ["calibration-report", "-p", str(files["probs"]), "-y", str(y), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, y, "3 labels for 1000")


def test_bad_report_empty_labels(files, tmp_path, capsys) -> None:
    y = tmp_path / "empty_y.npy"
    np.save(y, np.zeros(0, dtype=int))
    argv = ["calibration-report", "-p", str(files["probs"]), "-y", str(y), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, y, "empty")


def test_bad_report_nan(files, tmp_path, capsys) -> None:
    p = tmp_path / "nan_p.npy"
    probs = np.load(files["probs"])
    probs[0, 0] = np.nan
    np.save(p, probs)
    argv = ["calibration-report", "-p", str(p), "-y", str(files["test_y"]), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, p, "NaN")


def test_bad_report_labels_outside_the_class_range(files, tmp_path, capsys) -> None:
    y = tmp_path / "range_y.npy"
    labels = np.load(files["test_y"])
    labels[-1] = 5
    np.save(y, labels)
    argv = ["calibration-report", "-p", str(files["probs"]), "-y", str(y), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, y, "labels must lie")


def test_bad_saved_calibrator(files, tmp_path, capsys) -> None:
    saved = tmp_path / "NOT_CAL.json"
    saved.write_text(json.dumps({"method": "beta"}))
    argv = ["calibrate", "--apply", str(saved), "--scores", str(files["test"]), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "unknown 'beta'")
