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


def test_names_kind_auto_and_both_ways_of_listing_files(files, tmp_path, capsys) -> None:
    out = tmp_path / "ENS.json"
    # NAME=FILE and plain FILE, space-separated after one flag and repeated; no --kind
    argv = ["ensemble", "-p", f"strong={files['m0']}", str(files["m1"]), "-p",
            f"weak={files['m2']}", "-y", str(files["y"]), "--method", "learned", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["members"] == ["strong", "m1", "weak"]
    assert saved["member_files"] == [str(files["m0"]), str(files["m1"]), str(files["m2"])]
    assert saved["kind"] == "logits"  # detected: the rows are not distributions
    table = printed.splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["strong", "m1", "weak"]
    logits = np.stack([np.load(files[f"m{i}"]) for i in range(3)])
    w = learn_weights(logits, np.load(files["y"]), kind="logits")
    np.testing.assert_allclose(saved["weights"], w)
    assert "weights: strong " in printed


@pytest.mark.parametrize(
    "layout",
    [
        ["-p", "{m0}", "-p", "{m2}", "{m1}"],
        ["-p", "{m0}", "{m2}", "-p", "{m1}"],
        ["--predictions={m0}", "{m2}", "--kind", "logits", "-p{m1}"],
        ["-p", "{m0}", "--kind", "auto", "{m2}", "--", "{m1}"],
    ],
)
def test_weights_follow_the_command_line_order(files, tmp_path, capsys, layout) -> None:
    names = {f"m{i}": str(files[f"m{i}"]) for i in range(3)}
    out = tmp_path / "ENS.json"
    argv = ["ensemble", "-o", str(out), "--weights", "0,0,1", *[t.format(**names) for t in layout]]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["members"] == ["m0", "m2", "m1"]
    probs = tmp_path / "p.npy"
    assert main(["ensemble", "--apply", str(out), "-p", names["m0"], names["m2"], names["m1"],
                 "-o", str(probs)]) == 0  # fmt: skip
    np.testing.assert_allclose(np.load(probs), _softmax(np.load(files["m1"])))


def test_auto_reads_probability_files_as_probabilities(files, tmp_path) -> None:
    probs = [tmp_path / f"p{i}.npy" for i in range(3)]
    for i, path in enumerate(probs):
        np.save(path, _softmax(np.load(files[f"m{i}"])))
    out = tmp_path / "ENS.json"
    assert main(["ensemble", "-p", *map(str, probs), "-y", str(files["y"]), "-o", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["kind"] == "probabilities"
    # the same as soft voting the logits: equal weights of the same probabilities
    applied = tmp_path / "a.npy"
    assert main(["ensemble", "--apply", str(out), "-p", *map(str, probs), "-o", str(applied)]) == 0
    logits = np.stack([np.load(files[f"m{i}"]) for i in range(3)])
    np.testing.assert_allclose(np.load(applied), _softmax(logits).mean(axis=0))


def test_apply_matches_files_by_name(files, tmp_path) -> None:
    out = tmp_path / "ENS.json"
    names = [f"m{i}={files[f'm{i}']}" for i in range(3)]
    assert main(["ensemble", "-p", *names, "-y", str(files["y"]), "--method", "learned",
                 "-o", str(out)]) == 0  # fmt: skip
    in_order, shuffled = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["ensemble", "--apply", str(out), "-p", *names, "-o", str(in_order)]) == 0
    assert main(["ensemble", "--apply", str(out), "-p", names[2], names[0], names[1],
                 "-o", str(shuffled)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(in_order), np.load(shuffled))


def test_quiet_prints_only_the_wrote_line(files, tmp_path, capsys) -> None:
    out = tmp_path / "ENS.json"
    argv = ["ensemble", "-p", *_members(files), "-y", str(files["y"]), "--method", "caruana",
            "--quiet", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n"
    assert captured.err == ""


def test_the_seed_reaches_the_stacking_folds(files, tmp_path) -> None:
    runs = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"S{len(runs)}.json"
        argv = ["ensemble", "-p", *_members(files), "-y", str(files["y"]), "--method",
                "stacking", "--seed", str(seed), "-o", str(out)]  # fmt: skip
        assert main(argv) == 0
        runs[out] = json.loads(out.read_text())["validation"][-1]["nll"]
    a, b, c = runs.values()
    assert a == b and a != c


def test_saved_json_is_strict_json(files, tmp_path) -> None:
    out = tmp_path / "ENS.json"
    assert main(["ensemble", "-p", *_members(files), "-y", str(files["y"]), "-o", str(out)]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(out.read_text(), parse_constant=refuse)


# ----- bad input: one test each; exit code 2, the file named, nothing written -----


def _snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _bad(tmp_path, capsys, argv, named: Path | str, what: str) -> None:
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = _error_line(capsys)
    assert str(named) in err, err
    assert what in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # no output, no temporary file, inputs untouched


def _usage_error(tmp_path, capsys, argv, flag: str) -> None:
    """A usage error: exit 2, click's short usage message or one line, naming ``flag``."""
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and flag in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 4, err
    assert _snapshot(tmp_path) == before


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
    argv = _fit_argv([p, files["m0"]], files["y"], tmp_path, kind="probabilities")
    _bad(
        tmp_path, capsys, argv, p, "rows not summing to 1); if these are logits pass --kind logits"
    )


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


def test_bad_kind_value(files, tmp_path, capsys) -> None:
    argv = ["ensemble", "-p", *_members(files), "--kind", "logit", "-o", str(tmp_path / "E.json")]
    _bad(tmp_path, capsys, argv, "--kind", "expected auto, probabilities or logits, got 'logit'")


def test_bad_saved_ensemble(files, tmp_path, capsys) -> None:
    saved = tmp_path / "NOT_ENS.json"
    saved.write_text(json.dumps({"method": "soft"}))
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "not a modelfuse ensemble")


# ----- the convention's bad inputs -----


def test_bad_probabilities_given_with_kind_logits(files, tmp_path, capsys) -> None:
    p = tmp_path / "probs.npy"
    np.save(p, _softmax(np.load(files["m0"])))
    argv = _fit_argv([files["m1"], p], files["y"], tmp_path, kind="logits")
    _bad(tmp_path, capsys, argv, p,
         "every row is a probability distribution, not logits; pass --kind probabilities")  # fmt: skip


def test_bad_logits_given_with_kind_probabilities(files, tmp_path, capsys) -> None:
    argv = _fit_argv(_members(files), files["y"], tmp_path, kind="probabilities")
    _bad(tmp_path, capsys, argv, files["m0"], "if these are logits pass --kind logits")


def test_bad_mixed_kinds(files, tmp_path, capsys) -> None:
    p = tmp_path / "probs.npy"
    np.save(p, _softmax(np.load(files["m0"])))
    argv = ["ensemble", "-p", str(files["m1"]), str(p), "-o", str(tmp_path / "E.json")]
    _bad(tmp_path, capsys, argv, p, f"holds probabilities but {files['m1']} holds logits")


def test_bad_name_given_twice(files, tmp_path, capsys) -> None:
    argv = [
        "ensemble",
        "-p",
        f"a={files['m0']}",
        f"a={files['m1']}",
        "-o",
        str(tmp_path / "E.json"),
    ]
    _bad(tmp_path, capsys, argv, "--predictions", "the name 'a' is given twice")


def test_bad_npy_header_claiming_a_trillion_rows(files, tmp_path, capsys) -> None:
    import io

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                        "shape": (10**12, 3)})  # fmt: skip
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(header.getvalue() + b"\0" * 24)
    npz = tmp_path / "bomb.npz"
    np.savez(npz, a=np.zeros(3))
    import zipfile

    with zipfile.ZipFile(npz, "w") as archive:
        archive.writestr("a.npy", header.getvalue() + b"\0" * 24)
    _bad(tmp_path, capsys, _fit_argv([files["m0"], bomb], files["y"], tmp_path), bomb,
         "the header claims shape (1000000000000, 3)")  # fmt: skip
    _bad(tmp_path, capsys, _fit_argv([files["m0"], npz], files["y"], tmp_path), npz,
         "the header claims shape (1000000000000, 3)")  # fmt: skip


def test_bad_stacking_with_labels_of_one_class(files, tmp_path, capsys) -> None:
    y = tmp_path / "one_class.npy"
    np.save(y, np.ones(300, dtype=int))
    argv = _fit_argv(_members(files), y, tmp_path, method="stacking")
    _bad(tmp_path, capsys, argv, f"{y}: only class 1 occurs", "stacking fits a classifier")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1,nan,1", "--weights: expected finite numbers >= 0 with a positive sum, got '1,nan,1'"),
        ("1,-1,1", "--weights: expected finite numbers >= 0"),
        ("0,0,0", "--weights: expected finite numbers >= 0 with a positive sum"),
        ("1,2", "--weights: 2 weights for 3 models"),
        ("1;2;3", "--weights: expected comma-separated numbers such as 1,2,1, got '1;2;3'"),
    ],
)
def test_bad_weights(files, tmp_path, capsys, weights: str, message: str) -> None:
    argv = ["ensemble", "-p", *_members(files), "--weights", weights, "-o",
            str(tmp_path / "E.json")]  # fmt: skip
    _bad(tmp_path, capsys, argv, "--weights", message)


def test_bad_weights_for_a_method_that_learns_them(files, tmp_path, capsys) -> None:
    argv = [*_fit_argv(_members(files), files["y"], tmp_path), "--weights", "1,1,1"]
    _bad(tmp_path, capsys, argv, "--weights", "applies to --method soft, not learned")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--n-rounds", "0"),
        ("--n-rounds", "1000000000"),
        ("--cv", "1"),
        ("--n-init", "-1"),
        ("--n-bags", "-1"),
        ("--seed", "-1"),
    ],  # fmt: skip
)
def test_bad_numbers_are_usage_errors(files, tmp_path, capsys, option: str, value: str) -> None:
    argv = [*_fit_argv(_members(files), files["y"], tmp_path), option, value]
    _usage_error(tmp_path, capsys, argv, option)


@pytest.mark.parametrize(("option", "value"), [("--metric", "auc"), ("--average", "geometric")])
def test_bad_choices(files, tmp_path, capsys, option: str, value: str) -> None:
    argv = [*_fit_argv(_members(files), files["y"], tmp_path, method="caruana"), option, value]
    _bad(tmp_path, capsys, argv, option, f"unknown '{value}'; expected one of")


def test_bad_overwrite_of_an_input(files, tmp_path, capsys) -> None:
    saved = tmp_path / "ENS.json"
    assert main(_fit_argv(_members(files), files["y"], tmp_path)) == 0
    capsys.readouterr()
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o", str(files["m1"])]
    _bad(tmp_path, capsys, argv, files["m1"], "is the input of --predictions m1")  # not "exists"
    _bad(tmp_path, capsys, [*argv, "--overwrite"], files["m1"], "is the input of --predictions m1")


def test_bad_apply_of_logits_ensemble_to_probabilities(files, tmp_path, capsys) -> None:
    saved = tmp_path / "ENS.json"
    assert main(_fit_argv(_members(files), files["y"], tmp_path)) == 0
    capsys.readouterr()
    probs = [tmp_path / f"p{i}.npy" for i in range(3)]
    for i, path in enumerate(probs):
        np.save(path, _softmax(np.load(files[f"m{i}"])))
    argv = ["ensemble", "--apply", str(saved), "-p", *map(str, probs), "-o",
            str(tmp_path / "out.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, probs[0], f"holds probabilities, but {saved} was fitted on logits")


def test_bad_deeply_nested_saved_ensemble(files, tmp_path, capsys) -> None:
    saved = tmp_path / "DEEP.json"
    saved.write_text("[" * 100_000 + "]" * 100_000)
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, "nested too deeply")
    saved.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    _bad(tmp_path, capsys, argv, saved, "nested too deeply")


def _fitted(files, tmp_path, capsys, method: str = "learned") -> dict:
    """The saved form `modelfuse ensemble` writes (without its validation record)."""
    from modelfuse.ensemble import fit_ensemble

    logits = np.stack([np.load(p) for p in _members(files)])
    saved, _ = fit_ensemble(logits, np.load(files["y"]), kind="logits", method=method,
                            members=["m0", "m1", "m2"], random_state=0)  # fmt: skip
    return json.loads(json.dumps(saved))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("kind"), '"kind": missing'),
        (lambda s: s.pop("weights"), '"weights": missing'),
        (lambda s: s.update(weights="0.3,0.3,0.4"), '"weights": expected a list of numbers'),
        (lambda s: s.update(weights={"m0": 1}), '"weights": expected a list of numbers'),
        (lambda s: s.update(weights=[0.5, 0.5]), '"weights": expected shape (3,), got (2,)'),
        (lambda s: s.update(n_classes="3"), '"n_classes": expected an integer'),
        (lambda s: s.update(members={"m0": 1}), '"members": expected a list of 3 names'),
    ],
)
def test_bad_malformed_saved_ensembles(files, tmp_path, capsys, change, message: str) -> None:
    value = _fitted(files, tmp_path, capsys)
    change(value)
    saved = tmp_path / "BAD.json"
    saved.write_text(json.dumps(value))
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, message)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_bad_non_finite_weights_in_json(files, tmp_path, capsys, constant: str) -> None:
    value = _fitted(files, tmp_path, capsys)
    text = json.dumps(value).replace(json.dumps(value["weights"]), f"[0.5, {constant}, 0.5]")
    saved = tmp_path / "BAD.json"
    saved.write_text(text)
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, '"weights": holds NaN or infinite values')


def test_bad_stacking_classes_out_of_range(files, tmp_path, capsys) -> None:
    value = _fitted(files, tmp_path, capsys, method="stacking")
    value["stacking"]["classes"] = [0, 1, 7]
    saved = tmp_path / "BAD.json"
    saved.write_text(json.dumps(value))
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, '"stacking.classes": expected values in [0, 2]')


def test_bad_stacking_matrix_of_the_wrong_size(files, tmp_path, capsys) -> None:
    value = _fitted(files, tmp_path, capsys, method="stacking")
    value["stacking"]["coef"] = [row[:-1] for row in value["stacking"]["coef"]]
    saved = tmp_path / "BAD.json"
    saved.write_text(json.dumps(value))
    argv = ["ensemble", "--apply", str(saved), "-p", *_members(files), "-o",
            str(tmp_path / "p.npy")]  # fmt: skip
    _bad(tmp_path, capsys, argv, saved, '"stacking.coef": expected shape (3, 9), got (3, 8)')


def test_command_line_order_falls_back_when_arguments_do_not_match_up() -> None:
    from modelfuse.cli._inputs import _command_line_order

    takes_value = {"-o", "--out", "--kind"}
    raw = ["-p", "a", "b", "-o", "x.json", "-p", "c", "d"]
    assert _command_line_order(raw, ["a", "c"], ["b", "d"], takes_value) == ["a", "b", "c", "d"]
    # a positional the parser did not report, or one -p too many: click's order is kept
    assert _command_line_order(raw, ["a", "c"], ["b"], takes_value) is None
    assert _command_line_order([*raw, "-p", "e"], ["a", "c"], ["b", "d"], takes_value) is None


def test_a_non_finite_result_is_never_written(tmp_path, capsys) -> None:
    from modelfuse.cli.ensemble import write_saved_json
    from modelfuse.errors import DataError

    out = tmp_path / "E.json"
    with pytest.raises(DataError, match="holds NaN or infinite values; nothing was written"):
        write_saved_json(out, {"weights": [0.5, float("nan")]})
    assert list(tmp_path.iterdir()) == []


def test_caruana_reports_its_gain_and_the_selected_members_diversity(tmp_path, capsys):
    rng = np.random.default_rng(1)
    n, k = 300, 4
    y = rng.integers(0, k, n)
    files = []
    for i in range(3):
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 1.0 + 0.3 * i
        files.append(tmp_path / f"m{i}.npy")
        np.save(files[-1], logits)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "ens.json"
    argv = ["ensemble", "-p", *map(str, files), "-y", str(tmp_path / "y.npy")]
    assert main([*argv, "--method", "caruana", "-o", str(out)]) == 0
    selection = json.loads(out.read_text())["selection"]
    # the best member's validation NLL, written out
    logits = np.stack([np.load(f) for f in files])
    logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    best = min(-logp[i, np.arange(n), y].mean() for i in range(3))
    assert selection["gain"] == pytest.approx(best - selection["loss"], rel=1e-9)
    assert selection["gain"] > 0
    chosen = [i for i, c in enumerate(selection["counts"]) if c > 0]
    top = logits.argmax(axis=2)
    pairs = [(a, b) for a in chosen for b in chosen if a < b]
    expected = np.mean([(top[a] != top[b]).mean() for a, b in pairs]) if pairs else 0.0
    assert selection["disagreement"] == pytest.approx(expected)
    assert "better than the best member" in capsys.readouterr().out
