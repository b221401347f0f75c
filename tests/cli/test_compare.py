"""``modelfuse compare`` through the command line: output, report files, and every bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelfuse.cli import main
from modelfuse.evaluation import accuracy

RUN = [
    sys.executable,
    "-c",
    "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))",
]


def _data(tmp_path: Path, n: int = 300, k: int = 3) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    paths = {"y": tmp_path / "y.npy"}
    np.save(paths["y"], y)
    for name, acc in [("base", 0.6), ("soup", 0.7), ("ties", 0.85)]:
        hard = np.where(rng.random(n) < acc, y, (y + 1) % k)
        probs = np.eye(k)[hard] * 0.7 + 0.3 / k
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], probs)
    return paths


def _args(paths, out, *extra, names=("base", "soup", "ties")):
    args = ["compare"]
    for name in names:
        args += ["--predictions", f"{name}={paths[name]}"]
    return [*args, "--labels", str(paths["y"]), "-o", str(out), "--n-resamples", "300", *extra]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out"))


def test_compare_prints_the_table_and_writes_the_report(tmp_path, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    code = main(_args(paths, out, "--reference", "base"))
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split()[:2] == ["model", "accuracy"]
    assert "p (Holm)" in lines[0] and "diff vs base" in lines[0]
    assert lines[2].startswith("base (reference)")
    ties_line = next(line for line in lines if line.startswith("ties"))
    expected = accuracy(np.load(paths["ties"]), np.load(paths["y"]))
    assert f"{expected:.4g}" in ties_line
    assert "Friedman" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "critical_difference.png", "differences.png", "forest.png", "report.html", "report.md"
    ]
    report = (out / "report.md").read_text()
    assert "ties" in report and "![" in report
    assert _leftovers(tmp_path) == []


def test_two_candidates_get_no_cd_diagram_and_logits_are_accepted(tmp_path, capsys):
    paths = _data(tmp_path)
    for name in ("base", "soup"):
        np.save(paths[name], np.log(np.load(paths[name])))
    out = tmp_path / "out"
    code = main(_args(paths, out, "--kind", "logits", "--metric", "nll",
                      names=("base", "soup")))
    assert code == 0, capsys.readouterr().err
    assert not (out / "critical_difference.png").exists()
    assert (out / "forest.png").exists()
    assert "nll" in capsys.readouterr().out


def test_overwrite_replaces_an_existing_report(tmp_path, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(_args(paths, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "stale.txt").exists()
    assert main(_args(paths, out, "--overwrite")) == 0
    assert not (out / "stale.txt").exists() and (out / "report.md").exists()
    assert _leftovers(tmp_path) == []


def _bad_cases(tmp_path: Path, paths: dict[str, Path]):
    short = tmp_path / "short.npy"
    np.save(short, np.load(paths["soup"])[:-5])
    out_of_range = tmp_path / "y_bad.npy"
    np.save(out_of_range, np.load(paths["y"]) + 1)
    two_classes = tmp_path / "two.npy"
    np.save(two_classes, np.load(paths["soup"])[:, :2] / np.load(paths["soup"])[:, :2].sum(1,
            keepdims=True))
    base = ["compare", "-p", f"base={paths['base']}", "-o"]
    return {
        "missing file": (
            [*base, "OUT", "-p", f"soup={tmp_path / 'nope.npy'}", "--labels", str(paths["y"])],
            "nope.npy: no such file",
        ),
        "mismatched shapes": (
            [*base, "OUT", "-p", f"soup={short}", "--labels", str(paths["y"])],
            "shapes differ",
        ),
        "mismatched classes": (
            [*base, "OUT", "-p", f"soup={two_classes}", "--labels", str(paths["y"])],
            "shapes differ",
        ),
        "labels out of range": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(out_of_range)],
            "labels must lie in [0, 3)",
        ),
        "duplicate names": (
            [*base, "OUT", "-p", f"base={paths['soup']}", "--labels", str(paths["y"])],
            "'base' is given twice",
        ),
        "unknown reference": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--reference", "dare"],
            "reference: 'dare' is not a candidate; expected one of base, soup",
        ),
        "unknown metric": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--metric", "f1"],
            "unknown metric 'f1'; expected one of accuracy",
        ),
        "malformed item": (
            [*base, "OUT", "-p", str(paths["soup"]), "--labels", str(paths["y"])],
            "expected NAME=FILE",
        ),
        "unknown kind": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--kind", "scores"],
            "--kind",
        ),
        "bad confidence": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--confidence", "95"],
            "--confidence: expected a level in (0, 1)",
        ),
        "mcnemar on nll": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--metric", "nll", "--test", "mcnemar"],
            "McNemar",
        ),
    }


CASES = [
    "missing file", "mismatched shapes", "mismatched classes", "labels out of range",
    "duplicate names", "unknown reference", "unknown metric", "malformed item", "unknown kind",
    "mcnemar on nll", "bad confidence",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    paths = _data(tmp_path)
    argv, message = _bad_cases(tmp_path, paths)[case]
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("modelfuse: error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_end_to_end_in_a_subprocess(tmp_path):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([*RUN, *_args(paths, out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ties" in done.stdout and (out / "report.html").exists()
    assert "modelfuse compare --predictions base=" in (out / "report.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temp dir
    bad = subprocess.run(
        [*RUN, "compare", "-p", f"a={paths['base']}", "--labels", str(tmp_path / "none.npy"),
         "-o", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("modelfuse: error: ") and "none.npy" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_help_shows_an_example(capsys):
    assert main(["compare", "--help"]) == 0
    assert "modelfuse compare --predictions" in capsys.readouterr().out
