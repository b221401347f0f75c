"""``modelfuse compare`` through the command line: output, report files, and every bad input."""

from __future__ import annotations

import json
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
    assert ties_line.split()[1] == f"{expected:.4f}"
    assert "Friedman test over 10 blocks" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "critical_difference.png", "differences.png", "forest.png", "report.html", "report.md",
        "results.json",
    ]
    assert printed.splitlines()[-1].startswith(f"wrote {out}/")
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
    logits = tmp_path / "logits.npy"
    np.save(logits, np.log(np.load(paths["soup"])) + 1.0)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.load(paths["soup"])[:, 0])
    one_row = tmp_path / "one_row.npy"
    np.save(one_row, np.load(paths["soup"])[:1])
    one_label = tmp_path / "one_label.npy"
    np.save(one_label, np.load(paths["y"])[:1])
    groups_short = tmp_path / "groups_short.npy"
    np.save(groups_short, np.arange(299) // 3)
    one_group = tmp_path / "one_group.npy"
    np.save(one_group, np.zeros(300, dtype=int))
    groups = tmp_path / "groups.npy"
    np.save(groups, np.arange(300) // 3)
    rare = tmp_path / "rare.npy"
    np.save(rare, np.r_[np.ones(3, int), np.zeros(297, int)])
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
            "--reference: 'dare' is not a candidate; expected one of base, soup",
        ),
        "unknown metric": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--metric", "f1"],
            "--metric: unknown 'f1'; expected one of accuracy, balanced_accuracy",
        ),
        "malformed item": (
            [*base, "OUT", "-p", f"={paths['soup']}", "--labels", str(paths["y"])],
            "expected NAME=FILE or FILE",
        ),
        "plain file named twice": (
            [*base, "OUT", "-p", str(paths["base"]), "--labels", str(paths["y"])],
            "'base' is given twice",
        ),
        "unknown kind": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--kind", "scores"],
            "--kind: unknown 'scores'; expected one of auto, probabilities, logits",
        ),
        "unknown test": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--test", "wilcoxon"],
            "--test: unknown 'wilcoxon'; expected one of bootstrap, permutation, mcnemar",
        ),
        "unknown interval": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--interval", "bc"],
            "--interval: unknown 'bc'; expected one of bca, percentile",
        ),
        "mcnemar on nll": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--metric", "nll", "--test", "mcnemar"],
            "--test mcnemar compares accuracies, but --metric is nll; pass --test bootstrap",
        ),
        "probabilities given as logits": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--kind", "logits"],
            "base.npy: every row is a probability distribution, not logits; "
            "pass --kind probabilities (or --kind auto)",
        ),
        "logits given as probabilities": (
            [*base, "OUT", "-p", f"soup={logits}", "--labels", str(paths["y"]),
             "--kind", "probabilities"],
            "if these are logits pass --kind logits (or --kind auto)",
        ),
        "no candidates": (
            ["compare", "--labels", str(paths["y"]), "-o", "OUT"],
            "--predictions: give each candidate's file",
        ),
        "one-dimensional predictions": (
            [*base, "OUT", "-p", f"soup={flat}", "--labels", str(paths["y"])],
            "shapes differ",
        ),
        "path of an unknown user": (
            [*base, "OUT", "-p", "~nosuchuser/a.npy", "--labels", str(paths["y"])],
            "~nosuchuser/a.npy: no such file",
        ),
        "one sample": (
            ["compare", "-p", str(one_row), "-o", "OUT", "--labels", str(one_label)],
            "1 sample; comparing needs at least 2 labelled samples",
        ),
        "auroc with a rare class, not stratified": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(rare),
             "--metric", "auroc"],
            "(a class is missing from them); pass --stratify or evaluate on more samples",
        ),
        "groups of the wrong length": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "--groups", str(groups_short)],
            "groups_short.npy: expected one group id per sample, shape (300,), got (299,)",
        ),
        "a single group": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "-g", str(one_group)],
            "one_group.npy: all 300 samples are in one group; --groups needs at least 2 groups",
        ),
        "groups with mcnemar": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "-g", str(groups), "--test", "mcnemar"],
            "error: --test mcnemar treats samples as independent, but --groups was given; "
            "pass --test bootstrap or --test permutation",
        ),
        "groups with stratify": (
            [*base, "OUT", "-p", f"soup={paths['soup']}", "--labels", str(paths["y"]),
             "-g", str(groups), "--stratify"],
            "error: --stratify resamples within classes and --groups resamples whole groups; "
            "pass one of them",
        ),
        "a huge name": (
            [*base, "OUT", "-p", f"{'x' * 5000}={paths['soup']}", "--labels", str(paths["y"]),
             "--reference", "y" * 5000],
            "--reference: '" + "y" * 60 + "' is not a candidate; expected one of base, "
            + "x" * 40,
        ),
    }


CASES = [
    "missing file", "mismatched shapes", "mismatched classes", "labels out of range",
    "duplicate names", "unknown reference", "unknown metric", "malformed item",
    "plain file named twice", "unknown kind", "unknown test", "unknown interval",
    "mcnemar on nll", "probabilities given as logits", "logits given as probabilities",
    "no candidates", "one-dimensional predictions", "path of an unknown user", "one sample",
    "auroc with a rare class, not stratified", "a huge name", "groups of the wrong length",
    "a single group", "groups with mcnemar", "groups with stratify",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    paths = _data(tmp_path)
    argv, message = _bad_cases(tmp_path, paths)[case]
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    before = _snapshot(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2
    assert err.startswith("modelfuse: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err + captured.out
    assert not out.exists()
    assert _snapshot(tmp_path) == before


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


USAGE_CASES = {
    "confidence above 1": (["--confidence", "95"], "--confidence"),
    "confidence of 0": (["--confidence", "0"], "--confidence"),
    "too few resamples": (["--n-resamples", "10"], "--n-resamples"),
    "too many resamples": (["--n-resamples", "100000000"], "--n-resamples"),
    "one block": (["--blocks", "1"], "--blocks"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "seed not a number": (["--seed", "x"], "--seed"),
    "misspelt option": (["--n-resample", "300"], "--n-resample"),
    "too few permutations": (["--n-permutations", "10"], "--n-permutations"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_out_of_range_numbers_are_usage_errors(tmp_path, capsys, case):
    paths = _data(tmp_path)
    extra, flag = USAGE_CASES[case]
    out = tmp_path / "out"
    before = _snapshot(tmp_path)
    argv = ["compare", "-p", str(paths["base"]), str(paths["soup"]), "-y", str(paths["y"]),
            "-o", str(out), *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert flag in err and "Traceback" not in err
    assert not out.exists() and _snapshot(tmp_path) == before


def test_overwrite_never_deletes_an_input(tmp_path, capsys):
    paths = _data(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("base", "soup"):
        (inputs / f"{name}.npy").write_bytes(paths[name].read_bytes())
    before = _snapshot(tmp_path)
    for out in (inputs, tmp_path, inputs / "base.npy"):
        argv = ["compare", "-p", str(inputs / "base.npy"), str(inputs / "soup.npy"),
                "-y", str(paths["y"]), "-o", str(out), "--overwrite"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("modelfuse: error: ") and err.count("\n") == 1
        assert "choose another -o" in err
    assert _snapshot(tmp_path) == before


def test_plain_files_space_separated_and_repeated_flags(tmp_path, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    argv = ["compare", "-p", str(paths["base"]), f"best={paths['ties']}", "-p",
            str(paths["soup"]), "-y", str(paths["y"]), "-o", str(out), "--n-resamples", "200",
            "--reference", "best"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["reference"] == "best"
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["base", "best", "soup"]
    names = [(c["name"], c["file"]) for c in results["candidates"]]
    assert names == [("base", str(paths["base"])), ("best", str(paths["ties"])),
                     ("soup", str(paths["soup"]))]  # the command line's order


def test_kind_auto_reads_logits_and_probabilities_alike(tmp_path, capsys):
    paths = _data(tmp_path)
    probs = np.load(paths["soup"])
    logits = tmp_path / "soup_logits.npy"
    np.save(logits, np.log(probs) + 3.0)  # softmax(log p + c) == p
    common = ["-y", str(paths["y"]), "--n-resamples", "200", "--metric", "nll", "--quiet"]
    assert main(["compare", "-p", str(paths["base"]), f"soup={paths['soup']}",
                 "-o", str(tmp_path / "a"), *common]) == 0
    assert main(["compare", "-p", str(paths["base"]), f"soup={logits}",
                 "-o", str(tmp_path / "b"), *common]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    y = np.load(paths["y"])
    nll = -np.mean(np.log(probs[np.arange(len(y)), y]))
    assert a["candidates"][1]["value"] == pytest.approx(nll, rel=1e-12)
    assert b["candidates"][1]["value"] == pytest.approx(nll, rel=1e-12)
    printed = capsys.readouterr().out
    assert printed.splitlines() == [
        f"wrote {tmp_path / 'a'}/ (differences.png, forest.png, report.html, report.md, "
        "results.json)",
        f"wrote {tmp_path / 'b'}/ (differences.png, forest.png, report.html, report.md, "
        "results.json)",
    ]


def test_results_json_holds_every_number_of_the_table(tmp_path, capsys):
    from modelfuse.evaluation import compare_predictions

    paths = _data(tmp_path)
    out = tmp_path / "out"
    assert main(_args(paths, out, "--seed", "3", "--test", "bootstrap")) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    arrays = {n: np.load(paths[n]) for n in ("base", "soup", "ties")}
    y = np.load(paths["y"])
    expected = compare_predictions(arrays, y, n_resamples=300, random_state=3, test="bootstrap")
    assert results["n_samples"] == 300 and results["reference"] == "base"
    # 300 resamples are too few for BCa: the percentile interval, and the results say so
    assert results["test"] == "bootstrap"
    assert results["interval_method"] == "bootstrap percentile (BCa unstable)"
    assert results["notes"] == [] and results["findings"] == list(expected.notes)
    assert results["difference_intervals"] == "holm-consistent"
    assert results["family_size"] == 2 and results["n_test_resamples"] == 799
    for row, c in zip(results["candidates"], expected.candidates):
        assert row["name"] == c.name
        assert row["value"] == c.estimate.statistic == accuracy(arrays[c.name], y)
        assert row["interval"] == list(c.estimate.ci)
        if c.difference is None:
            assert row["difference"] is None and row["pvalue_adjusted"] is None
            continue
        assert row["difference"] == c.difference.statistic
        assert row["difference_interval"] == list(c.difference.ci)
        assert row["pvalue"] == c.raw_pvalue and row["pvalue_adjusted"] == c.test.pvalue
        assert row["holm_consistent_interval"] == list(c.adjusted_difference.ci)
        assert row["significant"] == c.significant
        shown = f"{row['pvalue_adjusted']:.4f}" if row["pvalue_adjusted"] >= 1e-4 else "<0.0001"
        line = next(x for x in printed.splitlines() if x.startswith(c.name))
        cells = line.split()
        assert cells[-2] == shown and cells[-1] in ("better", "worse", "significant")
    f = expected.friedman
    assert results["friedman"]["statistic"] == f.statistic
    assert results["friedman"]["pvalue"] == f.pvalue
    assert results["friedman"]["mean_ranks"] == dict(zip(f.compared, f.mean_ranks))


def test_tiny_pvalues_print_as_less_than_not_zero(tmp_path, capsys):
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 2, n)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "bad.npy", np.eye(2)[np.where(rng.random(n) < 0.55, y, 1 - y)])
    np.save(tmp_path / "good.npy", np.eye(2)[np.where(rng.random(n) < 0.95, y, 1 - y)])
    out = tmp_path / "out"
    argv = ["compare", "-p", str(tmp_path / "bad.npy"), str(tmp_path / "good.npy"),
            "-y", str(tmp_path / "y.npy"), "-o", str(out), "--test", "mcnemar"]
    assert main(argv) == 0
    good = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("good"))
    assert good.split()[-2:] == ["<0.0001", "better"]
    assert " <0.0001 |" in (out / "report.md").read_text()
    assert "<td>&lt;0.0001</td>" in (out / "report.html").read_text()
    assert "0.0000" not in (out / "report.md").read_text()


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
    text = capsys.readouterr().out
    assert "modelfuse compare --predictions" in text
    assert "--quiet" in text and "--kind" in text and "auto" in text


def test_a_skipped_friedman_test_is_one_warning_line(tmp_path, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    assert main(_args(paths, out, "--blocks", "200")) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "modelfuse: warning: --blocks 200: no Friedman test, as 300 samples give fewer than 2 "
        "per block; pass --blocks 150 or fewer to rank the candidates\n"
    )
    assert "Friedman" not in captured.out
    assert json.loads((out / "results.json").read_text())["friedman"] is None


def test_npz_keys_name_their_candidates_and_are_inputs_too(tmp_path, capsys):
    paths = _data(tmp_path)
    archive = tmp_path / "inputs" / "preds.npz"
    archive.parent.mkdir()
    np.savez(archive, soup=np.load(paths["soup"]), ties=np.load(paths["ties"]))
    out = tmp_path / "out"
    argv = ["compare", "-p", f"{archive}:soup", f"{archive}:ties", "-y", str(paths["y"]),
            "-o", str(out), "--n-resamples", "200", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["candidates"]] == ["soup", "ties"]
    y = np.load(paths["y"])
    assert results["candidates"][1]["value"] == accuracy(np.load(paths["ties"]), y)
    capsys.readouterr()
    argv[argv.index(str(out))] = str(archive.parent)
    assert main([*argv, "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert archive.is_file()


def test_an_interrupt_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    import modelfuse.report.comparison as comparison_report

    paths = _data(tmp_path)
    out = tmp_path / "out"
    real = comparison_report.write_comparison_report

    def interrupted(comparison, folder, **options):
        real(comparison, folder, **options)  # every file written into the staging folder
        raise KeyboardInterrupt

    monkeypatch.setattr(comparison_report, "write_comparison_report", interrupted)
    before = _snapshot(tmp_path)
    assert main(_args(paths, out)) == 130
    assert capsys.readouterr().err == "modelfuse: interrupted; nothing was written\n"
    assert not out.exists() and _leftovers(tmp_path) == []
    assert _snapshot(tmp_path) == before


def test_identical_candidates_print_as_one_row_with_notes(tmp_path, capsys):
    paths = _data(tmp_path)
    np.save(tmp_path / "wise_ft.npy", np.load(paths["base"]))
    out = tmp_path / "out"
    argv = _args(paths, out, "-p", str(tmp_path / "wise_ft.npy"))
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split("  ")[0] for line in printed[2:5]]
    assert rows == ["base = wise_ft (reference)", "soup", "ties"]
    assert "Holm-consistent CI of diff" in printed[0]
    notes = [line for line in printed if line.startswith("note: ")]
    assert any("base = wise_ft: identical predictions" in n for n in notes)
    assert notes[-1].startswith("note: highest accuracy on these 300 samples: ties (")
    assert "picked on the samples it is scored on" in notes[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["family_size"] == 2
    assert [c["same_as"] for c in results["candidates"]] == [["wise_ft"], [], [], ["base"]]


def test_too_few_permutations_warn_in_one_line_and_still_write(tmp_path, capsys):
    paths = _data(tmp_path)
    np.save(tmp_path / "dare.npy", np.load(paths["soup"])[::-1])
    out = tmp_path / "out"
    # 3 comparisons, 100 permutations: the smallest Holm p is 3 * 2 / 101 > 0.05
    argv = _args(paths, out, "-p", str(tmp_path / "dare.npy"), "--test", "permutation",
                 "--n-permutations", "100", "--quiet")
    assert main(argv) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "no candidate can be found" in line]
    assert len(warning) == 1 and "pass --n-permutations 1199 (or more)" in warning[0]
    assert "0.0594" in warning[0]
    assert "n_permutations" not in captured.err and "Traceback" not in captured.err
    assert captured.out.splitlines() == [
        f"wrote {out}/ (critical_difference.png, differences.png, forest.png, report.html, "
        "report.md, results.json)"
    ]
    assert "pass n_permutations >= 1199" in (out / "report.md").read_text()


def test_a_floor_above_alpha_over_ten_is_a_note(tmp_path, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "out"
    assert main(_args(paths, out, "--test", "permutation", "--n-permutations", "100")) == 0
    captured = capsys.readouterr()
    assert "note: the smallest Holm-adjusted p-value 100 resamples can give over 2 " \
        "comparison(s) is 0.0396 (alpha 0.05)" in captured.out
    assert "no candidate can be found" not in captured.err


def test_groups_resample_whole_groups(tmp_path, capsys):
    paths = _data(tmp_path)
    np.save(tmp_path / "groups.npy", np.arange(300) // 3)
    out = tmp_path / "out"
    argv = _args(paths, out, "--groups", str(tmp_path / "groups.npy"), "--test", "permutation")
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert "cluster, 100 groups" in results["interval_method"]
    assert "whole groups, 100" in results["test_method"]
