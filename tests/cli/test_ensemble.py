"""``modelfuse ensemble`` through the command line: fit, apply, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelfuse.cli import main
from modelfuse.ensemble import caruana_selection, learn_weights, soft_vote

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
    labels = rng.integers(0, 3, size=300)
    out: dict[str, Path] = {}
    for i, skill in enumerate([2.0, 1.0, 0.3]):
        logits = rng.normal(size=(300, 3)) + skill * np.eye(3)[labels]
        out[f"m{i}"] = tmp_path / f"m{i}.npy"
        np.save(out[f"m{i}"], logits)
    out["y"] = tmp_path / "y.npy"
    np.save(out["y"], labels)
    return out


def _members(files: dict[str, Path]) -> list[str]:
    return [str(files[f"m{i}"]) for i in range(3)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelfuse: error: ")
    assert "\n" not in err  # one line
    return err


@pytest.mark.parametrize("method", ["soft", "learned", "caruana", "stacking"])
def test_fit_then_apply_every_method(files, tmp_path, capsys, method: str) -> None:
    out = tmp_path / "ENS.json"
    argv = ["ensemble", "--predictions", *_members(files), "--labels", str(files["y"])]
    assert main([*argv, "--kind", "logits", "--method", method, "-o", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["method"] == method and saved["kind"] == "logits"
    assert "ensemble" in capsys.readouterr().out
    probs_out = tmp_path / "p.npy"
    code = main(["ensemble", "--apply", str(out), "--predictions", *_members(files),
                 "-o", str(probs_out)])  # fmt: skip
    assert code == 0
    probs = np.load(probs_out)
    logits = np.stack([np.load(p) for p in _members(files)])
    labels = np.load(files["y"])
    if method == "soft":
        np.testing.assert_allclose(probs, _softmax(logits).mean(axis=0))
    elif method == "learned":
        w = learn_weights(logits, labels, kind="logits")
        np.testing.assert_allclose(probs, soft_vote(logits, kind="logits", weights=w))
    elif method == "caruana":
        w = caruana_selection(logits, labels, kind="logits", random_state=0).weights
        np.testing.assert_allclose(probs, soft_vote(logits, kind="logits", weights=w))
    else:
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
        assert (probs.argmax(1) == labels).mean() > 0.7


def test_repeated_option_npz_and_csv_inputs(files, tmp_path) -> None:
    npz = tmp_path / "two.npz"
    np.savez(npz, a=np.load(files["m0"]), b=np.load(files["m1"]))
    csv = tmp_path / "m2.csv"
    np.savetxt(csv, np.load(files["m2"]), delimiter=",", header="c0,c1,c2", comments="")
    out = tmp_path / "ENS.json"
    code = main(["ensemble", "-p", f"{npz}:a", "-p", f"{npz}:b", "-p", str(csv),
                 "--kind", "logits", "--weights", "1,1,2", "-o", str(out)])  # fmt: skip
    assert code == 0
    assert json.loads(out.read_text())["weights"] == pytest.approx([0.25, 0.25, 0.5])


def test_subprocess_end_to_end_and_help(files, tmp_path) -> None:
    out = tmp_path / "ENS.json"
    done = subprocess.run(
        [*RUN, "ensemble", "--predictions", *_members(files), "--labels", str(files["y"]),
         "--kind", "logits", "--method", "caruana", "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "weights:" in done.stdout
    helped = subprocess.run([*RUN, "ensemble", "--help"], capture_output=True, text=True)
    assert "modelfuse ensemble --predictions a.npy" in helped.stdout


def test_existing_output_is_kept_without_overwrite(files, tmp_path, capsys) -> None:
    out = tmp_path / "ENS.json"
    out.write_text("keep")
    argv = ["ensemble", "-p", *_members(files), "--kind", "logits", "-o", str(out)]
    assert main(argv) == 2
    assert str(out) in _error_line(capsys)
    assert out.read_text() == "keep"
    assert main([*argv, "--overwrite"]) == 0


# ----- bad input: one test each; exit code 2, the file named, nothing written -----


def _bad(tmp_path, capsys, argv, named: Path | str, what: str) -> None:
    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    err = _error_line(capsys)
    assert str(named) in err, err
    assert what in err, err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary file


def _fit_argv(paths, labels, tmp_path, kind="logits", method="learned"):
    return ["ensemble", "-p", *map(str, paths), "--labels", str(labels), "--kind", kind,
            "--method", method, "-o", str(tmp_path / "ENS.json")]  # fmt: skip


def test_bad_unknown_method(files, tmp_path, capsys) -> None:
    argv = _fit_argv([files["m0"], files["m1"]], files["y"], tmp_path, method="boosting")
    _bad(tmp_path, capsys, argv, "--method",
         "--method: unknown 'boosting'; expected one of soft, learned, caruana, stacking")  # fmt: skip


def test_bad_mismatched_shapes_between_models(files, tmp_path, capsys) -> None:
    short = tmp_path / "short.npy"
    np.save(short, np.load(files["m1"])[:200])
    before = set(tmp_path.iterdir())
    argv = _fit_argv([files["m0"], short], files["y"], tmp_path)
    assert main(argv) == 2
    err = _error_line(capsys)
    assert str(short) in err and "differs from" in err
    assert set(tmp_path.iterdir()) == before


def test_bad_mismatched_number_of_classes(files, tmp_path, capsys) -> None:
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((300, 4)))
    _bad(tmp_path, capsys, _fit_argv([files["m0"], wide], files["y"], tmp_path), wide,
         "differs from")  # fmt: skip


def test_bad_labels_of_another_length(files, tmp_path, capsys) -> None:
    y = tmp_path / "y_short.npy"
    np.save(y, np.load(files["y"])[:100])
    _bad(tmp_path, capsys, _fit_argv(_members(files), y, tmp_path), y, "100 labels for 300")


def test_bad_probabilities_that_do_not_sum_to_one(files, tmp_path, capsys) -> None:
    p = tmp_path / "p.npy"
    np.save(p, np.full((300, 3), 0.3))
    argv = _fit_argv([p, p], files["y"], tmp_path, kind="probabilities")
    _bad(tmp_path, capsys, argv, p, "sum to 1")


def test_bad_nan(files, tmp_path, capsys) -> None:
    z = np.load(files["m0"])
    z[5, 1] = np.nan
    bad = tmp_path / "nan.npy"
    np.save(bad, z)
    _bad(tmp_path, capsys, _fit_argv([files["m1"], bad], files["y"], tmp_path), bad, "NaN")


def test_bad_inf(files, tmp_path, capsys) -> None:
    z = np.load(files["m0"])
    z[0, 0] = np.inf
    bad = tmp_path / "inf.npy"
    np.save(bad, z)
    _bad(tmp_path, capsys, _fit_argv([bad, files["m1"]], files["y"], tmp_path), bad, "inf")


def test_bad_labels_outside_the_class_range(files, tmp_path, capsys) -> None:
    y = tmp_path / "y_range.npy"
    labels = np.load(files["y"])
    labels[3] = 3
    np.save(y, labels)
    _bad(tmp_path, capsys, _fit_argv(_members(files), y, tmp_path), y, "labels must lie")


def test_bad_empty_array(files, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 3)))
    _bad(tmp_path, capsys, _fit_argv([files["m0"], empty], files["y"], tmp_path), empty, "empty")


def test_bad_missing_file(files, tmp_path, capsys) -> None:
    missing = tmp_path / "missing.npy"
    _bad(tmp_path, capsys, _fit_argv([files["m0"], missing], files["y"], tmp_path), missing,
         "no such file")  # fmt: skip


def test_bad_apply_with_another_number_of_models(files, tmp_path, capsys) -> None:
    saved = tmp_path / "ENS.json"
    assert main(_fit_argv(_members(files), files["y"], tmp_path)) == 0
    capsys.readouterr()
    argv = ["ensemble", "--apply", str(saved), "-p", str(files["m0"]), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "combines 3 models")


def test_bad_apply_with_another_number_of_classes(files, tmp_path, capsys) -> None:
    saved = tmp_path / "ENS.json"
    assert main(_fit_argv(_members(files), files["y"], tmp_path)) == 0
    capsys.readouterr()
    wide = [tmp_path / f"w{i}.npy" for i in range(3)]
    for path in wide:
        np.save(path, np.zeros((10, 4)))
    argv = ["ensemble", "--apply", str(saved), "-p", *map(str, wide), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, wide[0], "4 classes")


def test_bad_kind_is_never_guessed(files, tmp_path, capsys) -> None:
    argv = ["ensemble", "-p", *_members(files), "-o", str(tmp_path / "ENS.json")]
    _bad(tmp_path, capsys, argv, "--kind", "probabilities or logits")


def test_bad_saved_ensemble(files, tmp_path, capsys) -> None:
    saved = tmp_path / "NOT_ENS.json"
    saved.write_text(json.dumps({"method": "soft"}))
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "not a modelfuse ensemble")
