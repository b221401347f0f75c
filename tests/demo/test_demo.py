"""End to end: ``modelfuse demo --quick``, once in-process and once in a subprocess.

The subprocess runs ``--seeds 3,4`` (without the federated scenario), so the
two runs share seed 3's study: equal seeds give identical tables, and the
cross-seed summary is checked against the per-seed numbers. Independent
references: the uniform soup on disk against numpy's mean of the
fine-tunes' safetensors, and an individual model's accuracy on both test
splits against a numpy forward pass on a split rebuilt with scikit-learn.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from modelfuse.cli import main

SEED = 3
QUICK_SOUP = 4

SOUP_METHODS = [
    *(f"ft-{i}" for i in range(1, QUICK_SOUP + 1)),
    "pre-trained",
    "uniform soup",
    "greedy soup",
    "Fisher merge",
    "RegMean",
    "task arithmetic",
    "TIES",
    "DARE",
    "Model Stock",
    "WiSE-FT",
    "DaWin",
    "AdaMerging",
    "gradient matching",
    "soft vote",
    "Caruana ensemble",
    "distilled ensemble",
]
SHIFT = "tilted by 15 to 30 degrees either way"
TEST_ACCURACY = "Soup scenario, test split: accuracy"
SHIFT_ACCURACY = f"Soup scenario, shifted test split ({SHIFT}): accuracy"
MULTITASK_METHODS = [
    "task-original",
    "task-rotated",
    "task-inverted",
    "task-noisy",
    "pre-trained",
    "average",
    "task arithmetic",
    "TIES",
    "DARE",
    "Fisher merge",
    "RegMean",
    "soft vote",
    "distilled ensemble",
]


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _cells(section: str) -> list[list[str]]:
    """The cells of every table line: the header, the separator, then the rows."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def _table(section: str) -> list[dict[str, str]]:
    headers, _, *rows = _cells(section)
    # duplicate headers ("95% CI"): the last wins
    return [dict(zip(headers, cells)) for cells in rows]


def _raw_rows(section: str) -> list[list[str]]:
    return _cells(section)[2:]


def _interval(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"\[(-inf|-?\d+\.\d+), (inf|-?\d+\.\d+)\]", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    first, second = root / "first", root / "second"
    script = (
        "import sys; import modelfuse.demo.run as run; run._flower_installed = lambda: False; "
        "from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    # the second run (no federated scenario) works beside the first: the demo trains with one
    # thread, so two runs share two cores
    command = [sys.executable, "-c", script, "demo", "--quick", "--out", str(second)]
    child = subprocess.Popen(
        [*command, "--seeds", f"{SEED},{SEED + 1}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = io.StringIO()
    torch.set_num_threads(2)
    try:
        with contextlib.redirect_stdout(out):
            code = main(["demo", "--quick", "--out", str(first), "--seed", str(SEED)])
        threads_after = torch.get_num_threads()
        ray_left_running = _ray_running()
        stdout, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    return {
        "code": code,
        "stdout": out.getvalue(),
        "first": first,
        "second": second,
        "proc": proc,
        "threads_after": threads_after,
        "ray_left_running": ray_left_running,
    }


def test_the_command_succeeds_and_writes_the_report(runs):
    assert runs["code"] == 0
    assert runs["proc"].returncode == 0, runs["proc"].stderr
    for name in ("report.md", "report.html", "results.json"):
        assert (runs["first"] / name).is_file()
    # the terminal ends with the summary table, the time per stage and the report's path
    stdout = runs["stdout"]
    assert "Time per stage" in stdout
    assert "Caruana ensemble" in stdout
    assert "Multi-task scenario, pooled test split: the" in stdout.replace("\n", " ")
    assert str(runs["first"] / "report.md") in stdout.replace("\n", "")
    assert not list(runs["first"].parent.glob(".first.*"))  # no temporary folder left
    assert runs["threads_after"] == 2  # the demo trains with one thread, then restores it
    assert not runs["ray_left_running"]  # the federated scenario shuts down the Ray it started


def _names(rows: list[dict[str, str]]) -> list[str]:
    """Every candidate's name; a row of identical models lists them joined by ' = '."""
    return [n for r in rows for n in r["method"].split(" = ")]


def _check_metric_table(raw: list[list[str]], bounded: bool) -> list[str]:
    """Each row's numbers parse, the verdict follows from the Holm-adjusted p and the sign, and
    the Holm-consistent interval of the difference excludes 0 exactly when the verdict is
    significant. Returns the verdicts."""
    references = 0
    verdicts = []
    for cells in raw:
        name, family, cost, value, ci, diff, diff_ci, p, said = cells
        verdicts.append(said)
        low, high = _interval(ci)
        assert low <= high and int(cost) >= 1
        if bounded:
            assert 0 <= low <= high <= 1 and 0 <= float(value) <= 1
        if said == "reference":
            references += 1
            assert diff == diff_ci == p == ""
            continue
        d, pv = float(diff), float(p)
        d_low, d_high = _interval(diff_ci)
        assert d_low <= d_high and 0 <= pv <= 1
        excludes_zero = d_low > 0 or d_high < 0
        if pv <= 0.05 and d != 0:
            assert said in ("better", "worse")
            assert excludes_zero, cells
        else:
            assert said == "no significant difference"
            assert not excludes_zero, cells
    assert references == 1
    reference = next(r for r in raw if r[-1] == "reference")
    for cells in raw:  # each difference is the candidate's value minus the reference's
        if cells[-1] != "reference":
            assert float(cells[5]) == pytest.approx(float(cells[3]) - float(reference[3]), abs=2e-4)
    return verdicts


def test_every_method_has_a_row_whose_numbers_parse(runs):
    sections = _sections((runs["first"] / "report.md").read_text())
    rows = _table(sections[TEST_ACCURACY])
    names = _names(rows)
    calibrated = [n for n in names if n.endswith(" + temperature")]
    assert sorted(n for n in names if n not in calibrated) == sorted(SOUP_METHODS)
    assert len(calibrated) <= 2 and len(names) == len(SOUP_METHODS) + len(calibrated)
    labels = [r["method"] for r in rows]
    for section in (TEST_ACCURACY, SHIFT_ACCURACY):
        raw = _raw_rows(sections[section])
        assert [r[0] for r in raw] == labels
        verdicts = _check_metric_table(raw, bounded=True)
        assert verdicts.count("reference") == 1
    soft = next(r for r in rows if r["method"] == "soft vote")
    assert soft["networks run"] == str(QUICK_SOUP)  # an ensemble runs every member
    dawin = next(r for r in rows if "DaWin" in r["method"].split(" = "))
    assert dawin["networks run"] == "3"
    for split in ("test split", f"shifted test split ({SHIFT})"):
        for metric in ("NLL", "ECE"):
            raw = _raw_rows(sections[f"Soup scenario, {split}: {metric}"])
            assert [r[0] for r in raw] == labels
            _check_metric_table(raw, bounded=metric == "ECE")
            assert all(float(r[3]) > 0 for r in raw) or metric == "ECE"
    per_task = _table(sections["Multi-task scenario: accuracy per task"])
    assert [r["method"] for r in per_task] == MULTITASK_METHODS
    for r in per_task:
        accs = [float(r[t]) for t in ("original", "rotated", "inverted", "noisy")]
        assert float(r["mean"]) == pytest.approx(np.mean(accs), abs=1e-4)
    pooled = _raw_rows(sections["Multi-task scenario: comparison with the best task model"])
    assert sorted(n for r in pooled for n in r[0].split(" = ")) == sorted(MULTITASK_METHODS)
    _check_metric_table(pooled, bounded=True)
    results = json.loads((runs["first"] / "results.json").read_text())
    assert [r["name"] for r in results["soup"]["rows"]] == labels
    assert [r["name"] for r in results["soup"]["shifted"]["rows"]] == labels


def test_the_summary_sentences_follow_the_tables(runs):
    sections = _sections((runs["first"] / "report.md").read_text())
    summary = " ".join(sections["Summary"].split())
    for section, split in ((TEST_ACCURACY, "test"), (SHIFT_ACCURACY, "shifted")):
        rows = _table(sections[section])
        reference = next(r["method"] for r in rows if r["verdict"] == "reference")
        for word in ("better", "worse"):
            listed = [r["method"] for r in rows if r["verdict"] == word]
            if listed:
                assert (
                    f"Significantly {word} than {reference} in {split} accuracy (Holm-adjusted "
                    f"p <= 0.05): "
                    + ", ".join(
                        f"{r['method']} ({r[f'difference to {reference}']})"
                        for r in rows
                        if r["verdict"] == word
                    )
                ) in summary
            else:
                assert (
                    f"No candidate is significantly {word} than {reference} in {split}" in summary
                )
        top = max(float(r["accuracy"]) for r in rows)
        winner = next(r for r in rows if float(r["accuracy"]) == top)
        head = f"Highest {split} accuracy: {winner['method']} ({top:.4f}"
        assert head in summary
        tail = summary[summary.index(head) :]
        assert f"picked on the {split} split it is scored on" in tail.split(".")[1] + tail
        if winner["verdict"] == "reference":
            assert "it is the reference itself" in tail.split(". ")[0]
        elif winner["verdict"] == "better":
            assert "is significant (Holm-adjusted p" in tail.split(". ")[0] + tail
        else:
            assert "is not significant (Holm-adjusted p =" in tail
    # where fusion helps: each merge or ensemble is classed by its two verdicts
    test = {r["method"]: r for r in _table(sections[TEST_ACCURACY])}
    shift = {r["method"]: r for r in _table(sections[SHIFT_ACCURACY])}
    expected = {"both": [], "test": [], "shift": [], "hurts": [], "neither": []}
    for name, row in test.items():
        if row["family"] == "individual":
            continue
        a, b = row["verdict"], shift[name]["verdict"]
        key = (
            "both"
            if a == b == "better"
            else "test"
            if a == "better" and b != "worse"
            else "shift"
            if b == "better" and a != "worse"
            else "hurts"
            if "worse" in (a, b)
            else "neither"
        )
        expected[key].append(name)
    lines = {
        "both": "Helps on both test splits: ",
        "test": "Helps only in distribution (test split): ",
        "shift": "Helps only under the shift: ",
        "hurts": "Significantly worse on at least one split (and better on neither): ",
        "neither": "No significant difference on either split: ",
    }
    for key, names in expected.items():
        if not names:
            if key in ("both", "test", "shift"):
                assert lines[key] + "none." in summary
            continue
        start = summary.index(lines[key]) + len(lines[key])
        said = summary[start : summary.index(".", summary.index(names[-1], start))]
        assert [part.split(" (test ")[0] for part in said.split("), ")] == names


def test_every_image_referenced_exists_and_is_embedded_in_the_html(runs):
    markdown = (runs["first"] / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    expected = {
        "soup_accuracy.png",
        "soup_shift_accuracy.png",
        "dawin_lambdas.png",
        "greedy_soup_trace.png",
        "wise_ft_curve.png",
        "multitask_per_task.png",
        "reliability_1_before.png",
        "reliability_1_after.png",
        "soup_risk_coverage.png",
    }
    assert expected <= set(images)
    for name in images:
        assert (runs["first"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (runs["first"] / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(images)
    assert all(s.startswith("data:image/png;base64,") for s in sources)


def test_same_seed_gives_identical_tables(runs):
    def soup_and_multitask(folder: Path) -> str:
        sections = _sections((folder / "report.md").read_text())
        kept = {
            k: v
            for k, v in sections.items()
            if k.startswith(("Soup scenario,", "Multi-task", "WiSE-FT", "DaWin", "Model zoo"))
        }
        return "\n".join(f"{k}\n{v}" for k, v in kept.items()).replace(str(folder), "OUT")

    first, second = soup_and_multitask(runs["first"]), soup_and_multitask(runs["second"])
    assert first.count("|") > 400
    assert first == second

    a = json.loads((runs["first"] / "results.json").read_text())
    b = json.loads((runs["second"] / "results.json").read_text())
    assert a["soup"] == b["soup"] and a["multitask"] == b["multitask"]
    assert b["seeds"] == [SEED, SEED + 1] and b["federated"] is None
    for model in ("ft-1", "task-rotated", "pretrained"):
        x = (runs["first"] / "models" / model / "model.safetensors").read_bytes()
        assert x == (runs["second"] / "models" / model / "model.safetensors").read_bytes()
    assert not list(runs["second"].glob(".seed-*"))  # the other seed's files are removed


def test_the_cross_seed_summary_is_computed_from_each_seeds_numbers(runs):
    second = runs["second"]
    data = json.loads((second / "results.json").read_text())
    across = data["across_seeds"]
    first_rows = {
        split: {r["name"]: r for r in rows}
        for split, rows in (
            ("test", data["soup"]["rows"]),
            ("shift", data["soup"]["shifted"]["rows"]),
        )
    }
    reference = data["soup"]["reference"]
    methods = [s["method"] for s in across if s["split"] == "test"]
    assert methods[0].startswith("reference") and "uniform soup" in methods and "DaWin" in methods
    assert not any(m.startswith("ft-") or m.endswith("temperature") for m in methods)
    for s in across:
        accs = s["accuracies"]
        assert len(accs) == 2
        assert s["mean"] == pytest.approx(np.mean(accs))
        assert s["sd"] == pytest.approx(np.std(accs, ddof=1))
        assert 0 <= s["better"] + s["worse"] + s["same_as_reference"] <= 2
        # seed 3 is the study reported in full: its numbers are the tables'
        rows = first_rows[s["split"]]
        name = (
            reference
            if s["method"].startswith("reference")
            else next(n for n in rows if s["method"] in n.split(" = "))
        )
        assert accs[0] == pytest.approx(rows[name]["metrics"]["accuracy"]["value"])
        ref_acc = rows[reference]["metrics"]["accuracy"]["value"]
        assert s["differences"][0] == pytest.approx(accs[0] - ref_acc)
    sections = _sections((second / "report.md").read_text())
    table = _table(sections["Soup scenario across seeds: test split"])
    assert [r["method"] for r in table] == methods
    for row, s in zip(table, (s for s in across if s["split"] == "test")):
        assert float(row["mean accuracy"]) == pytest.approx(s["mean"], abs=5e-5)
        assert float(row["SD across seeds"]) == pytest.approx(s["sd"], abs=5e-5)
    summary = " ".join(sections["Summary"].split())
    for split, label in (("test", "the test split"), ("shift", "the shifted test split")):
        always = [s["method"] for s in across if s["split"] == split and s["better"] == 2]
        said = summary[summary.index(f"On {label}, across 2 seeds") :]
        part = said.split("on every seed: ")[1].split(". Better on some")[0]
        assert [p.split(" (")[0] for p in part.split("), ")] == (always or ["none"])
        some = [s for s in across if s["split"] == split and 0 < s["better"] < 2]
        part = said.split("Better on some seeds only: ")[1].split(". Worse on")[0]
        expected = [f"{s['method']} ({s['better']} of 2 seeds" for s in some] or ["none"]
        assert [p.split(", mean")[0] for p in part.split("), ")] == expected
    for label in ("test split", "shifted test split"):
        heading = f"Soup scenario across seeds: {label}"
        said = [line for line in sections[heading].split("\n\n") if line.startswith("On the ")]
        assert len(said) == 1 and said[0].startswith(f"On the {label}, across 2 seeds")


def test_the_uniform_soup_on_disk_is_the_mean_of_the_fine_tunes(runs):
    folder = runs["first"]
    tunes = [load_file(folder / "models" / f"ft-{i}" / "model.safetensors") for i in (1, 2, 3, 4)]
    soup = load_file(folder / "merges" / "uniform-soup" / "model.safetensors")
    assert sorted(soup) == sorted(tunes[0])
    for name, tensor in soup.items():
        np.testing.assert_allclose(tensor, np.mean([t[name] for t in tunes], axis=0), atol=1e-6)
    config = json.loads((folder / "models" / "ft-1" / "config.json").read_text())
    assert config["layer_sizes"][0] == 64 and config["layer_sizes"][-1] == 10
    # the saved configurations name the models relative to themselves: re-run through the CLI
    remerged = folder.parent / "remerged"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["merge", str(folder / "configs" / "uniform-soup.yaml"), str(remerged)])
    assert code == 0
    assert (remerged / "model.safetensors").read_bytes() == (
        folder / "merges" / "uniform-soup" / "model.safetensors"
    ).read_bytes()
    assert "../models/ft-1" in (folder / "configs" / "fisher.yaml").read_text()


def test_an_individual_models_accuracy_matches_a_numpy_forward_pass_on_both_splits(runs):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from modelfuse.demo.data import shifted

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.3, stratify=y, random_state=SEED
    )
    weights = load_file(runs["first"] / "models" / "ft-2" / "model.safetensors")
    sections = _sections((runs["first"] / "report.md").read_text())
    for images, section in ((x_test, TEST_ACCURACY), (shifted(x_test, SEED), SHIFT_ACCURACY)):
        h = np.maximum(images @ weights["0.weight"].T + weights["0.bias"], 0)
        h = np.maximum(h @ weights["2.weight"].T + weights["2.bias"], 0)
        logits = h @ weights["4.weight"].T + weights["4.bias"]
        expected = float(np.mean(logits.argmax(1) == y_test))
        rows = _table(sections[section])
        reported = float(next(r for r in rows if "ft-2" in r["method"].split(" = "))["accuracy"])
        assert reported == pytest.approx(expected, abs=6e-5)


def test_an_existing_folder_that_is_not_a_demo_is_refused(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelfuse: error: ") and str(target) in err and "--out" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_out_folder_under_a_file_is_refused_naming_the_file(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    before = file.stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(file / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("modelfuse: error: ") and f"{file} is a file, not a folder" in err
    assert "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert file.read_text() == "keep me" and file.stat().st_mtime_ns == before


def test_a_failing_run_leaves_nothing_and_keeps_an_earlier_output(tmp_path, monkeypatch):
    import modelfuse.demo.zoo

    def broken_zoo(splits, settings, folder, seed, *, on_model=None, soup_only=False):
        folder.mkdir(parents=True)
        (folder / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("training failed")

    monkeypatch.setattr(modelfuse.demo.zoo, "build_zoo", broken_zoo)
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / "report.md").write_text("# an earlier demo")
    (earlier / "results.json").write_text("{}")
    with pytest.raises(RuntimeError, match="training failed"):
        main(["demo", "--quick", "--out", str(earlier)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert (earlier / "report.md").read_text() == "# an earlier demo"
    with pytest.raises(RuntimeError):
        main(["demo", "--quick", "--out", str(tmp_path / "new" / "deeper" / "demo")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no folder made for OUT


FEDERATED = ["FedAvg", "FedAvgM", "FedAU", "TIES", "Fisher"]


def test_the_federated_scenario_is_reported_from_its_numbers(runs):
    markdown = (runs["first"] / "report.md").read_text()
    sections = _sections(markdown)
    results = json.loads((runs["first"] / "results.json").read_text())["federated"]
    assert results["settings"]["rounds"] == 6 and results["settings"]["clients"] == 10
    assert "6 rounds (the full run has 30, --quick fewer)" in sections["Federated scenario: setup"]
    scenarios = results["scenarios"]
    assert [s["concentration"] for s in scenarios] == [0.3, 10.0]
    rows = _table(sections["Federated scenario: global accuracy"])
    assert [(r["concentration"], r["model"]) for r in rows] == [
        (c, m) for c in ("0.3", "10") for m in [*FEDERATED, "local models"]
    ]
    for scenario in scenarios:
        assert sum(sum(n) for n in scenario["client_sizes"]) == 1797
        curves = scenario["accuracy_per_round"]
        assert list(curves) == FEDERATED
        assert all([p["round"] for p in c] == list(range(7)) for c in curves.values())
        assert len({json.dumps(c[0]) for c in curves.values()}) == 1  # the same initial model
        by_name = {r["name"]: r for r in scenario["rows"]}
        for name in FEDERATED:  # the table's final accuracy is the curve's last point
            assert by_name[name]["metrics"]["accuracy"]["value"] == pytest.approx(
                curves[name][-1]["test"]
            )
            low, high = by_name[name]["metrics"]["accuracy"]["ci"]
            assert low <= by_name[name]["metrics"]["accuracy"]["value"] <= high
        for row in (r for r in rows if r["concentration"] == f"{scenario['concentration']:g}"):
            assert float(row["held-out accuracy"]) == pytest.approx(
                by_name[row["model"]]["metrics"]["accuracy"]["value"], abs=5e-5
            )
        per_client = scenario["per_client"]
        # the global model of the per-client table: the best pooled validation accuracy
        best_val = max(FEDERATED, key=lambda n: (curves[n][-1]["val"], -FEDERATED.index(n)))
        assert per_client["global_model"] == best_val
        heading = f"Federated scenario: local, global or between (concentration {scenario['concentration']:g})"
        table = _table(sections[heading])
        assert [r["client"] for r in table] == [f"client {k}" for k in range(10)]
        gains = [
            r["client"]
            for r in table
            if float(r["p (Holm)"]) < 0.05 and float(r["global - local"]) > 0
        ]
        assert gains == per_client["gains"]
        for r in table:  # global - local is the difference of the two columns
            assert float(r["global - local"]) == pytest.approx(
                float(r["global"]) - float(r["local"]), abs=2e-4
            )
        n_gain = len(per_client["gains"])
        n_lose = len(per_client["losses"])
        sentence = (
            f"concentration {scenario['concentration']:g}: {n_gain} of 10 clients gain from the "
            f"global model ({best_val}), {n_lose} lose"
        )
        assert sentence in " ".join(sections["Summary"].split())
    assert "federated_rounds.png" in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert (runs["first"] / "federated_rounds.png").read_bytes()[:4] == b"\x89PNG"
    assert "Federated scenario, Dirichlet concentration 0.3" in runs["stdout"].replace("\n", " ")


def test_notes_name_the_stage_each_warning_came_from(runs):
    notes = _sections((runs["first"] / "report.md").read_text())["Notes"]
    paragraphs = [p.strip() for p in notes.split("\n\n") if p.strip()]
    assert paragraphs
    stages = (
        "data",
        "model zoo",
        "soup scenario",
        "multi-task scenario",
        "test-split",
        "federated",
    )
    for p in paragraphs:
        assert p == "No warnings were raised during the run." or (
            p.startswith("During the ") and p[len("During the ") :].startswith(stages)
        ), p


# --- the distilled rows, diversity and risk-coverage (issue 16) ---------------------------------

DISTILLED = "Distilled ensembles: K networks back to one"
DIVERSITY = "Ensembles: diversity beside the gain"
SELECTIVE = "Selective prediction: risk-coverage on the test split"


def _test_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.3, stratify=y, random_state=SEED
    )
    return x_test, y_test


def _forward(weights: dict, images: np.ndarray) -> np.ndarray:
    """The MLP's log-probabilities by numpy, in float64."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    h = np.maximum(images @ w["0.weight"].T + w["0.bias"], 0)
    h = np.maximum(h @ w["2.weight"].T + w["2.bias"], 0)
    z = h @ w["4.weight"].T + w["4.bias"]
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for i in range(bins):
        inside = (top > edges[i]) & (top <= edges[i + 1])
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - top[inside].mean())
    return total


def test_the_distilled_rows_match_a_numpy_forward_pass_of_their_saved_weights(runs):
    from modelfuse.demo.data import apply_task, shifted, task_seed

    folder = runs["first"]
    x_test, y_test = _test_split()
    sections = _sections((folder / "report.md").read_text())
    weights = load_file(folder / "distilled" / "soup" / "model.safetensors")
    config = json.loads((folder / "distilled" / "soup" / "config.json").read_text())
    assert config["distilled"]["teacher"] == "soft vote"
    assert 1 <= config["distilled"]["best_epoch"] <= config["distilled"]["epochs"] <= 10
    results = json.loads((folder / "results.json").read_text())
    for images, section in ((x_test, TEST_ACCURACY), (shifted(x_test, SEED), SHIFT_ACCURACY)):
        lp = _forward(weights, images)
        row = next(r for r in _table(sections[section]) if r["method"] == "distilled ensemble")
        assert row["networks run"] == "1" and row["family"] == "distilled"
        assert float(row["accuracy"]) == pytest.approx(np.mean(lp.argmax(1) == y_test), abs=6e-5)
        nll_section = section.replace(": accuracy", ": NLL")
        nll_row = next(r for r in _table(sections[nll_section]) if r["method"] == row["method"])
        nll = -np.mean(lp[np.arange(len(y_test)), y_test])
        assert float(nll_row["NLL"]) == pytest.approx(nll, abs=1e-4)
    # the multi-task student on the pooled test images of every task
    tasks = ("original", "rotated", "inverted", "noisy")
    pooled = np.concatenate(
        [apply_task(t, x_test, task_seed(SEED, j, "test")) for j, t in enumerate(tasks)]
    )
    mt = load_file(folder / "distilled" / "multitask" / "model.safetensors")
    lp = _forward(mt, pooled)
    pooled_rows = _table(sections["Multi-task scenario: comparison with the best task model"])
    row = next(r for r in pooled_rows if r["method"] == "distilled ensemble")
    expected = np.mean(lp.argmax(1) == np.tile(y_test, len(tasks)))
    assert float(row["accuracy"]) == pytest.approx(expected, abs=6e-5)
    mt_values = next(d for d in results["distilled"] if d["where"].startswith("Multi-task"))
    y_pooled = np.tile(y_test, len(tasks))
    assert mt_values["values"]["distilled"]["nll"] == pytest.approx(
        -np.mean(lp[np.arange(len(y_pooled)), y_pooled]), abs=1e-6
    )
    assert mt_values["values"]["distilled"]["ece"] == pytest.approx(
        _ece(np.exp(lp), y_pooled), abs=1e-6
    )


def test_the_distilled_sentences_agree_with_their_table(runs):
    sections = _sections((runs["first"] / "report.md").read_text())
    text = " ".join(sections[DISTILLED].split())
    table = _table(sections[DISTILLED])
    accuracy = {r["method"]: r for r in _table(sections[TEST_ACCURACY])}
    wheres = list(dict.fromkeys(r["where"] for r in table))
    assert len(wheres) == 3 and len(table) == 9
    for where in wheres:
        rows = {r["role"]: r for r in table if r["where"] == where}
        ensemble, merge, student = (
            rows["ensemble (teacher)"],
            rows["best merge (start)"],
            rows["distilled"],
        )
        assert student["networks run"] == "1" and merge["networks run"] == "1"
        assert ensemble["networks run"] == "4" and ensemble["model"] == "soft vote"
        if where == "Soup scenario, test split":  # the same numbers as the comparison table
            for r in (ensemble, merge, student):
                assert r["accuracy"] == accuracy[r["model"]]["accuracy"]
        for metric, greater in (("accuracy", True), ("NLL", False), ("ECE", False)):
            d = float(student[metric])
            for other, label in ((ensemble, "the ensemble"), (merge, merge["model"])):
                o = float(other[metric])
                pattern = (
                    rf"{metric} {re.escape(student[metric])}, [^;]*?(the same as|better than|"
                    rf"worse than) {re.escape(label)} \({re.escape(other[metric])}, difference "
                    r"([+-]\d\.\d{4})\)"
                )
                found = re.search(f"{re.escape(where)}: the distilled ensemble .*?{pattern}", text)
                assert found, (where, metric, label)
                word, diff = found.group(1), float(found.group(2))
                assert diff == pytest.approx(d - o, abs=1.1e-4)  # of the unrounded values
                if abs(d - o) > 1e-4:
                    assert word == ("better than" if (d > o) == greater else "worse than")
                elif diff == 0:
                    assert word == "the same as"
        gain = float(ensemble["accuracy"]) - float(merge["accuracy"])
        kept = float(student["accuracy"]) - float(merge["accuracy"])
        number = r"([+-]\d\.\d{4})"
        if gain > 1e-4 and kept > gain + 1e-4:
            found = re.search(
                f"{re.escape(where)}: the distilled ensemble is more accurate than the ensemble "
                f"itself: {number} over {re.escape(merge['model'])} where the ensemble gains "
                f"{number}",
                text,
            )
            assert found and float(found.group(1)) == pytest.approx(kept, abs=1.1e-4)
            assert float(found.group(2)) == pytest.approx(gain, abs=1.1e-4)
        elif gain > 1e-4 and kept < gain - 1e-4:
            found = re.search(
                f"{re.escape(where)}: the distilled ensemble keeps (-?\\d+)% of the ensemble's "
                f"accuracy gain over {re.escape(merge['model'])} \\({number} of {number}\\)",
                text,
            )
            assert found, where
            share, k_said, g_said = (float(g) for g in found.groups())
            assert k_said == pytest.approx(kept, abs=1.1e-4)
            assert g_said == pytest.approx(gain, abs=1.1e-4)
            assert share == pytest.approx(100 * k_said / g_said, abs=1.5)
        elif gain < -1e-4:
            assert f"{where}: the ensemble is not more accurate than {merge['model']}" in text
    summary = " ".join(_sections((runs["first"] / "report.md").read_text())["Summary"].split())
    assert f"{wheres[0]}: the distilled ensemble (1 network per prediction)" in summary


def test_the_diversity_numbers_follow_their_formulas(runs):
    folder = runs["first"]
    x_test, y_test = _test_split()
    members = [
        np.exp(_forward(load_file(folder / "models" / f"ft-{i}" / "model.safetensors"), x_test))
        for i in range(1, QUICK_SOUP + 1)
    ]
    p = np.stack(members)  # (K, n, classes)
    k, n = p.shape[:2]
    results = json.loads((folder / "results.json").read_text())
    row = next(
        r
        for r in results["diversity"]
        if r["ensemble"] == "soup scenario: soft vote" and r["split"] == "test split"
    )
    top = p.argmax(axis=2)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    assert row["disagreement"] == pytest.approx(
        np.mean([np.mean(top[i] != top[j]) for i, j in pairs]), abs=1e-12
    )
    mean = p.mean(axis=0)

    def h(q):
        return -np.sum(q * np.log(np.clip(q, 1e-300, None)), axis=-1)

    assert row["mutual_information"] == pytest.approx(
        np.mean(h(mean) - h(p).mean(axis=0)), abs=1e-6
    )
    member_nll = -np.log(p[:, np.arange(n), y_test]).mean(axis=1)
    ensemble_nll = -np.log(mean[np.arange(n), y_test]).mean()
    assert row["nll"]["ensemble"] == pytest.approx(ensemble_nll, abs=1e-6)
    assert row["nll"]["ambiguity"] == pytest.approx(member_nll.mean() - ensemble_nll, abs=1e-6)
    assert row["nll"]["gain"] == pytest.approx(member_nll.min() - ensemble_nll, abs=1e-6)
    onehot = np.eye(10)[y_test]
    spread = np.mean([((q - mean) ** 2).sum(axis=1) for q in p], axis=0).mean()
    assert row["brier"]["ambiguity"] == pytest.approx(spread, abs=1e-8)
    member_brier = ((p - onehot) ** 2).sum(axis=2).mean(axis=1)
    ensemble_brier = ((mean - onehot) ** 2).sum(axis=1).mean()
    assert row["brier"]["gain"] == pytest.approx(member_brier.min() - ensemble_brier, abs=1e-8)
    # the report's table and sentences say the same numbers
    section = _sections((folder / "report.md").read_text())[DIVERSITY]
    shown = next(
        r
        for r in _table(section)
        if r["ensemble"] == "soup scenario: soft vote" and r["split"] == "test split"
    )
    assert float(shown["disagreement"]) == pytest.approx(row["disagreement"], abs=5e-5)
    assert float(shown["NLL ambiguity"]) == pytest.approx(row["nll"]["ambiguity"], abs=5e-5)
    assert shown["members"] == str(k)
    text = " ".join(section.split())
    assert (
        f"soup scenario: soft vote, test split: its {k} members disagree on "
        f"{row['disagreement']:.1%} of the images"
    ) in text
    caruana = [r for r in results["diversity"] if "Caruana" in r["ensemble"]]
    assert len(caruana) == 2 and all(r["members"] for r in caruana)


def test_the_risk_coverage_table_follows_the_predictions(runs):
    folder = runs["first"]
    x_test, y_test = _test_split()
    results = json.loads((folder / "results.json").read_text())
    rows = {r["model"]: r for r in results["risk_coverage"]}
    assert list(rows)[-2:] == ["soft vote", "distilled ensemble"]
    lp = _forward(load_file(folder / "distilled" / "soup" / "model.safetensors"), x_test)
    probs = np.exp(lp)
    confidence = probs.max(axis=1)
    errors = probs.argmax(axis=1) != y_test
    assert len(np.unique(confidence)) == len(confidence)  # no ties: a plain sort is the curve
    ordered = errors[np.argsort(-confidence)]
    risks = np.cumsum(ordered) / np.arange(1, len(ordered) + 1)
    aurc = risks.mean()
    m = int(errors.sum())
    covered = np.arange(1, len(ordered) + 1)
    oracle = np.mean(np.maximum(covered - (len(ordered) - m), 0) / covered)
    said = rows["distilled ensemble"]
    assert said["aurc"]["value"] == pytest.approx(aurc, abs=1e-6)
    assert said["e_aurc"]["value"] == pytest.approx(aurc - oracle, abs=1e-6)
    section = _sections((folder / "report.md").read_text())[SELECTIVE]
    table = {r["model"]: r for r in _table(section)}
    assert list(table) == list(rows)
    for name, r in rows.items():
        low, high = _interval(table[name]["95% CI of AURC"])
        assert low <= r["aurc"]["value"] <= high
        assert float(table[name]["AURC"]) == pytest.approx(r["aurc"]["value"], abs=5e-5)
    best = min(rows, key=lambda n: rows[n]["aurc"]["value"])
    assert f"Lowest AURC: {best} ({rows[best]['aurc']['value']:.4f})" in " ".join(section.split())


def test_gradient_matching_says_which_prior_it_chose(runs):
    results = json.loads((runs["first"] / "results.json").read_text())["soup"]
    built = _sections((runs["first"] / "report.md").read_text())["How each method was built"]
    said = " ".join(next(p for p in built.split("\n\n") if "gradient matching" in p).split())
    if results["gradient_matching_prior"] == "scalar":
        scale = results["gradient_matching_prior_scale"]
        assert f"scalar prior precision {scale:g} x the mean Fisher entry" in said
    else:
        assert results["gradient_matching_prior_scale"] is None
        assert "the paper's estimator: precision H0 = " in said
        assert "x the pre-trained model's exact diagonal Fisher" in said
