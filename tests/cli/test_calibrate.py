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
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["p"]
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
    assert "modelfuse calibration-report --predictions p.npy" in helped.stdout


# ----- bad input: one test each; exit code 2, the file named, nothing written -----


def _snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {
        p: (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _bad(tmp_path, capsys, argv, named, what: str) -> None:
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = _error_line(capsys)
    assert str(named) in err, err
    assert what in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing written, inputs untouched


def _usage_error(tmp_path, capsys, argv, flag: str) -> None:
    """A usage error: exit 2, click's short usage message or one line, naming ``flag``."""
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and flag in err, err
    assert len([line for line in err.splitlines() if line.strip()]) <= 4, err
    assert _snapshot(tmp_path) == before


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
    _bad(
        tmp_path, capsys, argv, s, "rows not summing to 1); if these are logits pass --kind logits"
    )


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
            str(tmp_path / "rep"), "--kind", "probabilities"]  # fmt: skip
    _bad(tmp_path, capsys, argv, p, "if these are logits pass --kind logits")


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


# ----- held-out metrics, regularisation, the saved form, the convention -----


def test_fit_prints_held_out_metrics_from_the_library(files, tmp_path, capsys) -> None:
    from modelfuse.calibration import VectorScaling, cross_validated_metrics

    cal = tmp_path / "CAL.json"
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "vector", "--cv", "4",
            "--seed", "7"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    z, y = np.load(files["val"]), np.load(files["val_y"])
    held_out = cross_validated_metrics(VectorScaling(), z, y, cv=4, random_state=7)
    row = next(
        line for line in printed.splitlines() if line.startswith("vector (held-out, 4-fold)")
    )
    assert row.split()[3] == f"{held_out.nll:.4f}"
    assert row.split()[-1] == f"{held_out.ece:.4f}"
    saved = json.loads(cal.read_text())["fitted_on"]
    assert saved["cross_validation"]["folds"] == 4 and saved["cross_validation"]["seed"] == 7
    assert saved["cross_validation"]["nll"] == pytest.approx(held_out.nll, rel=1e-12)
    assert saved["cross_validation"]["ece"] == pytest.approx(held_out.ece, rel=1e-12)
    assert [r["name"] for r in saved["metrics"]] == [
        "uncalibrated", "vector (in-sample)", "vector (held-out, 4-fold)"
    ]  # fmt: skip


def test_a_calibrator_worse_than_uncalibrated_held_out_is_warned_about(tmp_path, capsys) -> None:
    # calibrated logits already (labels drawn from their softmax), 120 samples, 6 classes,
    # and unregularised matrix scaling: it fits noise
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.5, size=(120, 6))
    y = (rng.uniform(size=(120, 1)) > _softmax(z).cumsum(axis=1)).sum(axis=1).clip(0, 5)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    argv = [*_fit(tmp_path / "z.npy", tmp_path / "y.npy", tmp_path), "--method", "matrix",
            "--reg", "0"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modelfuse: warning: matrix: the held-out NLL (")
    assert "is worse than uncalibrated" in lines[0]
    assert (tmp_path / "CAL.json").is_file()
    # temperature scaling (one parameter, T close to 1 here) does not draw the warning
    (tmp_path / "CAL.json").unlink()
    assert main(_fit(tmp_path / "z.npy", tmp_path / "y.npy", tmp_path)) == 0
    assert "warning" not in capsys.readouterr().err


def test_too_few_samples_for_the_folds_is_a_warning_not_an_error(tmp_path, capsys) -> None:
    np.save(tmp_path / "z.npy", np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]))
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 1]))
    assert main(_fit(tmp_path / "z.npy", tmp_path / "y.npy", tmp_path)) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(
        f"modelfuse: warning: held-out metrics not computed: {tmp_path / 'y.npy'}: the most "
        "frequent class has 3 samples, fewer than the 5 cross-validation folds"
    )
    assert "held-out" not in captured.out
    assert json.loads((tmp_path / "CAL.json").read_text())["fitted_on"]["cross_validation"] is None


def test_the_json_stores_the_printed_temperature(files, tmp_path, capsys) -> None:
    assert main(_fit(files["val"], files["val_y"], tmp_path)) == 0
    printed = capsys.readouterr().out
    temperature = json.loads((tmp_path / "CAL.json").read_text())["state"]["temperature_"]
    assert f"temperature: {temperature:.4f}" in printed
    reference = TemperatureScaling().fit(np.load(files["val"]), np.load(files["val_y"]))
    assert temperature == pytest.approx(reference.temperature_, rel=1e-9)
    assert temperature == pytest.approx(2.0, rel=0.15)  # the files were made with T = 2


def test_regularisation_options_reach_the_estimator(files, tmp_path) -> None:
    from modelfuse.calibration import HistogramBinning, MatrixScaling

    z, y = np.load(files["val"]), np.load(files["val_y"])
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "matrix", "--reg", "3.5"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "CAL.json").read_text())
    assert saved["params"]["reg"] == 3.5
    np.testing.assert_allclose(
        saved["state"]["coef_"]["array"], MatrixScaling(reg=3.5).fit(z, y).coef_, rtol=1e-6
    )
    (tmp_path / "CAL.json").unlink()
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "histogram", "--n-bins",
            "7", "--prior-strength", "0.5"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((tmp_path / "CAL.json").read_text())
    reference = HistogramBinning(kind="logits", n_bins=7, prior_strength=0.5).fit(z, y)
    np.testing.assert_allclose(saved["state"]["values_"][0]["array"], reference.values_[0])


def test_histogram_output_never_holds_a_zero(files, tmp_path) -> None:
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "histogram", "--n-bins",
            "100"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "o.npy"
    assert main(["calibrate", "--apply", str(tmp_path / "CAL.json"), "-s", str(files["test"]),
                 "-o", str(out)]) == 0  # fmt: skip
    probs = np.load(out)
    assert probs.min() > 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_kind_auto_and_quiet(files, tmp_path, capsys) -> None:
    cal = tmp_path / "CAL.json"
    argv = ["calibrate", "-p", str(files["probs"]), "-y", str(files["test_y"]), "--method",
            "platt", "--quiet", "-o", str(cal)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote {cal}\n"
    saved = json.loads(cal.read_text())
    assert saved["params"]["kind"] == "probabilities" == saved["fitted_on"]["kind"]
    out = tmp_path / "o.npy"
    argv = ["calibrate", "--apply", str(cal), "-s", str(files["probs"]), "-y",
            str(files["test_y"]), "--quiet", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote {out} (probabilities, shape (1000, 3))\n"


def test_report_of_several_named_inputs(files, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["calibration-report", "-p", f"soft={files['probs']}", str(files["test"]), "-y",
            str(files["test_y"]), "-o", str(out), "--n-bins", "10"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["metric", "soft", "test"]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["metrics.json", "metrics.md", "reliability-soft.png", "reliability-test.png"]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["predictions"] == {"soft": str(files["probs"]), "test": str(files["test"])}
    labels = np.load(files["test_y"])
    # the logits file is softmaxed (kind auto): the same probabilities as p.npy
    for name in ("soft", "test"):
        assert summary["metrics"][name]["ece (10 uniform bins)"] == pytest.approx(
            expected_calibration_error(np.load(files["probs"]), labels, n_bins=10)
        )
    assert "| metric | soft | test |" in (out / "metrics.md").read_text()


# ----- bad input of the convention and of saved calibrators -----


@pytest.mark.parametrize("verb", ["calibrate", "calibration-report"])
def test_bad_a_billion_bins(files, tmp_path, capsys, verb: str) -> None:
    if verb == "calibrate":
        argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "histogram"]
    else:
        argv = ["calibration-report", "-p", str(files["probs"]), "-y", str(files["test_y"]),
                "-o", str(tmp_path / "rep")]  # fmt: skip
    _usage_error(tmp_path, capsys, [*argv, "--n-bins", "1000000000"], "--n-bins")


@pytest.mark.parametrize(
    ("option", "value"), [("--cv", "1"), ("--cv", "1000"), ("--seed", "-1"), ("--reg", "-1")]
)
def test_bad_numbers_are_usage_errors(files, tmp_path, capsys, option: str, value: str) -> None:
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "vector", option, value]
    _usage_error(tmp_path, capsys, argv, option)


def test_bad_option_of_another_method(files, tmp_path, capsys) -> None:
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--reg", "5"]
    _bad(tmp_path, capsys, argv, "--reg", "applies to --method vector or matrix, not temperature")
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", "platt", "--n-bins", "5"]
    _bad(tmp_path, capsys, argv, "--n-bins", "applies to --method histogram, not platt")


def test_bad_probabilities_given_with_kind_logits(files, tmp_path, capsys) -> None:
    argv = [*_fit(files["probs"], files["test_y"], tmp_path), "--kind", "logits"]
    _bad(tmp_path, capsys, argv, files["probs"],
         "every row is a probability distribution, not logits; pass --kind probabilities")  # fmt: skip


def test_bad_logits_given_with_kind_probabilities(files, tmp_path, capsys) -> None:
    argv = ["calibration-report", "-p", str(files["test"]), "-y", str(files["test_y"]), "-o",
            str(tmp_path / "rep"), "--kind", "probabilities"]  # fmt: skip
    _bad(tmp_path, capsys, argv, files["test"], "if these are logits pass --kind logits")


def test_bad_apply_to_another_kind(files, tmp_path, capsys) -> None:
    assert main(_fit(files["val"], files["val_y"], tmp_path)) == 0
    capsys.readouterr()
    argv = ["calibrate", "--apply", str(tmp_path / "CAL.json"), "-s", str(files["probs"]), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, files["probs"], "holds probabilities, but")


def test_bad_npy_header_claiming_a_trillion_rows(files, tmp_path, capsys) -> None:
    import io

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                        "shape": (10**12, 3)})  # fmt: skip
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(header.getvalue() + b"\0" * 24)
    _bad(tmp_path, capsys, _fit(bomb, files["val_y"], tmp_path), bomb,
         "the header claims shape (1000000000000, 3)")  # fmt: skip


def test_bad_overwrite_of_an_input(files, tmp_path, capsys) -> None:
    assert main(_fit(files["val"], files["val_y"], tmp_path)) == 0
    capsys.readouterr()
    argv = ["calibrate", "--apply", str(tmp_path / "CAL.json"), "-s", str(files["test"]), "-o",
            str(files["test"]), "--overwrite"]  # fmt: skip
    _bad(tmp_path, capsys, argv, files["test"], "is the input of --scores")


def test_bad_report_folder_holding_an_input(files, tmp_path, capsys) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    p = folder / "p.npy"
    np.save(p, np.load(files["probs"]))
    argv = ["calibration-report", "-p", str(p), "-y", str(files["test_y"]), "-o", str(folder),
            "--overwrite"]  # fmt: skip
    _bad(tmp_path, capsys, argv, folder, "holds the input of --predictions p")


def test_bad_deeply_nested_saved_calibrator(files, tmp_path, capsys) -> None:
    saved = tmp_path / "DEEP.json"
    saved.write_text('{"method": ' * 100_000 + "1" + "}" * 100_000)
    argv = ["calibrate", "--apply", str(saved), "-s", str(files["test"]), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "nested too deeply")


def _fitted(files, tmp_path, capsys, method: str) -> dict:
    """The saved form `modelfuse calibrate` writes (without its fitted_on record)."""
    cal = make_calibrator(method, kind="logits").fit(np.load(files["val"]), np.load(files["val_y"]))
    return json.loads(json.dumps(cal.to_json()))


@pytest.mark.parametrize(
    ("method", "change", "message"),
    [
        ("temperature", lambda s: s.pop("state"), '"state": missing'),
        ("temperature", lambda s: s["params"].pop("kind"), '"params.kind": missing'),
        ("temperature", lambda s: s["state"].update(temperature_="2"), '"state.temperature_"'),
        ("vector", lambda s: s["state"].update(coef_={"a": 1}), '"state.coef_": expected a list'),
        ("vector", lambda s: s["state"].update(coef_=[1, 2]), '"state.coef_": expected shape (3,)'),
        (
            "matrix",
            lambda s: s["state"].update(coef_=[[1, 0], [0, 1]]),
            '"state.coef_": expected shape (3, 3), got (2, 2)',
        ),
        (
            "histogram",
            lambda s: s["params"].update(n_bins=10**9),
            '"params.n_bins": expected an integer in [1, 10000]',
        ),
        (
            "platt",
            lambda s: s["state"].update(n_classes_=4),
            '"state.coef_": expected shape (4,), got (3,)',
        ),
    ],
)
def test_bad_malformed_saved_calibrators(files, tmp_path, capsys, method, change, message) -> None:
    value = _fitted(files, tmp_path, capsys, method)
    change(value)
    saved = tmp_path / "BAD.json"
    saved.write_text(json.dumps(value))
    argv = ["calibrate", "--apply", str(saved), "-s", str(files["test"]), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, message)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_bad_non_finite_coefficients_in_json(files, tmp_path, capsys, constant: str) -> None:
    value = _fitted(files, tmp_path, capsys, "vector")
    value["state"]["intercept_"]["array"][1] = "__constant__"
    saved = tmp_path / "BAD.json"
    saved.write_text(json.dumps(value).replace('"__constant__"', constant))
    argv = ["calibrate", "--apply", str(saved), "-s", str(files["test"]), "-o",
            str(tmp_path / "o.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, '"state.intercept_": holds NaN or infinite values')


def test_scores_may_be_named(files, tmp_path) -> None:
    argv = ["calibrate", "-s", f"val={files['val']}", "-y", str(files["val_y"]), "-o",
            str(tmp_path / "CAL.json")]  # fmt: skip
    assert main(argv) == 0
    fitted_on = json.loads((tmp_path / "CAL.json").read_text())["fitted_on"]
    assert fitted_on["name"] == "val" and fitted_on["scores"] == str(files["val"])


@pytest.mark.parametrize("option", ["--reg", "--prior-strength"])
def test_bad_nan_regularisation(files, tmp_path, capsys, option: str) -> None:
    method = "vector" if option == "--reg" else "histogram"
    argv = [*_fit(files["val"], files["val_y"], tmp_path), "--method", method, option, "nan"]
    _usage_error(tmp_path, capsys, argv, option)


def test_bad_csv_of_a_million_columns(files, tmp_path, capsys) -> None:
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(["0.5"] * 1_000_000) + "\n")
    argv = ["calibration-report", "-p", str(wide), "-y", str(files["test_y"]), "-o",
            str(tmp_path / "rep")]  # fmt: skip
    _bad(tmp_path, capsys, argv, wide, "expected shape (n_samples, n_classes), got (1000000,)")
