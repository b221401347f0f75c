"""End to end: ``modelfuse demo --quick``, once in-process and once in a subprocess.

The two runs share the seed, so they also check that equal seeds give
identical tables. Independent references: the uniform soup on disk against
numpy's mean of the fine-tunes' safetensors, and an individual model's test
accuracy against a numpy forward pass on a split rebuilt with scikit-learn.
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
    "soft vote",
    "Caruana ensemble",
]
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
    match = re.fullmatch(r"\[(-?\d+\.\d+), (-?\d+\.\d+)\]", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    first, second = root / "first", root / "second"
    out = io.StringIO()
    torch.set_num_threads(2)
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--quick", "--out", str(first), "--seed", str(SEED)])
    threads_after = torch.get_num_threads()
    ray_left_running = _ray_running()
    script = "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "demo",
            "--quick",
            "--out",
            str(second),
            "--seed",
            str(SEED),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    assert str(runs["first"] / "report.md") in stdout.replace("\n", "")
    assert not list(runs["first"].parent.glob(".first.*"))  # no temporary folder left
    assert runs["threads_after"] == 2  # the demo trains with one thread, then restores it
    assert not runs["ray_left_running"]  # the federated scenario shuts down the Ray it started


def test_every_method_has_a_row_whose_numbers_parse(runs):
    sections = _sections((runs["first"] / "report.md").read_text())
    rows = _table(sections["Soup scenario: accuracy"])
    names = [r["method"] for r in rows]
    calibrated = [n for n in names if n.endswith(" + temperature")]
    assert names[: len(SOUP_METHODS)] == SOUP_METHODS
    assert len(calibrated) == 2 and len(names) == len(SOUP_METHODS) + 2
    raw = _raw_rows(sections["Soup scenario: accuracy"])
    references = 0
    for cells in raw:
        name, family, cost, acc, ci, diff, diff_ci, p, said = cells
        value = float(acc)
        low, high = _interval(ci)
        assert 0 <= low <= high <= 1 and 0 <= value <= 1
        assert int(cost) >= 1
        if said == "reference":
            references += 1
            assert diff == diff_ci == p == ""
            continue
        d, pv = float(diff), float(p)
        d_low, d_high = _interval(diff_ci)
        assert d_low <= d_high and 0 <= pv <= 1
        # the verdict follows from the Holm-adjusted p-value and the sign of the difference
        if pv < 0.05 and d > 0:
            assert said == "better"
        elif pv < 0.05 and d < 0:
            assert said == "worse"
        else:
            assert said == "no significant difference"
    assert references == 1
    reference = next(r for r in raw if r[-1] == "reference")
    for cells in raw:  # each difference is the candidate's accuracy minus the reference's
        if cells[-1] != "reference":
            assert float(cells[5]) == pytest.approx(float(cells[3]) - float(reference[3]), abs=2e-4)
    soft = next(r for r in rows if r["method"] == "soft vote")
    assert soft["networks run"] == str(QUICK_SOUP)  # an ensemble runs every member
    probs = _raw_rows(sections["Soup scenario: probabilities (NLL and ECE)"])
    assert [r[0] for r in probs] == names
    for cells in probs:
        assert float(cells[1]) > 0 and 0 <= float(cells[5]) <= 1
    per_task = _table(sections["Multi-task scenario: accuracy per task"])
    assert [r["method"] for r in per_task] == MULTITASK_METHODS
    for r in per_task:
        accs = [float(r[t]) for t in ("original", "rotated", "inverted", "noisy")]
        assert float(r["mean"]) == pytest.approx(np.mean(accs), abs=1e-4)
    pooled = _table(sections["Multi-task scenario: comparison with the best task model"])
    assert [r["method"] for r in pooled] == MULTITASK_METHODS
    results = json.loads((runs["first"] / "results.json").read_text())
    assert [r["name"] for r in results["soup"]["rows"]] == names


def test_every_image_referenced_exists_and_is_embedded_in_the_html(runs):
    markdown = (runs["first"] / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    expected = {
        "soup_accuracy.png",
        "greedy_soup_trace.png",
        "wise_ft_curve.png",
        "multitask_per_task.png",
        "reliability_1_before.png",
        "reliability_1_after.png",
    }
    assert expected <= set(images)
    for name in images:
        assert (runs["first"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (runs["first"] / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(images)
    assert all(s.startswith("data:image/png;base64,") for s in sources)


def test_same_seed_gives_identical_tables(runs):
    def without_timing(folder: Path) -> str:
        sections = _sections((folder / "report.md").read_text())
        sections.pop("Time per stage")
        return "\n".join(f"{k}\n{v}" for k, v in sections.items()).replace(str(folder), "OUT")

    first, second = without_timing(runs["first"]), without_timing(runs["second"])
    assert first.count("|") > 200
    assert first == second

    def numbers(folder: Path) -> dict:
        data = json.loads((folder / "results.json").read_text())
        data.pop("timings")
        return data

    assert numbers(runs["first"]) == numbers(runs["second"])
    for model in ("ft-1", "task-rotated", "pretrained"):
        a = (runs["first"] / "models" / model / "model.safetensors").read_bytes()
        assert a == (runs["second"] / "models" / model / "model.safetensors").read_bytes()


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


def test_an_individual_models_test_accuracy_matches_a_numpy_forward_pass(runs):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(
        x / 16.0, y, test_size=0.3, stratify=y, random_state=SEED
    )
    weights = load_file(runs["first"] / "models" / "ft-2" / "model.safetensors")
    h = np.maximum(x_test @ weights["0.weight"].T + weights["0.bias"], 0)
    h = np.maximum(h @ weights["2.weight"].T + weights["2.bias"], 0)
    logits = h @ weights["4.weight"].T + weights["4.bias"]
    expected = float(np.mean(logits.argmax(1) == y_test))
    rows = _table(_sections((runs["first"] / "report.md").read_text())["Soup scenario: accuracy"])
    reported = float(next(r for r in rows if r["method"] == "ft-2")["accuracy"])
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


def test_a_failing_run_leaves_nothing_and_keeps_an_earlier_output(tmp_path, monkeypatch):
    import modelfuse.demo.zoo

    def broken_zoo(splits, settings, folder, seed, *, on_model=None):
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
