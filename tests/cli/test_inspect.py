"""``modelfuse inspect`` end to end: the JSON, the heat map, the table, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelfuse.cli import main
from modelfuse.inspection import tensor_figures

NAMES = {
    "model.embed_tokens.weight": (30, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in NAMES.items()}
    save_file(base, tmp_path / "base.safetensors")
    for name in ("a", "b"):
        save_file(
            {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()},
            tmp_path / f"{name}.safetensors",
        )
    (tmp_path / "ties.yaml").write_text(
        "merge_method: ties\nbase_model: base.safetensors\n"
        "models:\n  - model: a.safetensors\n  - model: b.safetensors\n"
        "parameters: {density: 0.5}\n"
    )
    (tmp_path / "linear.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(args: list[str], capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    before, names = _snapshot(folder), sorted(os.listdir(folder))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error:"), err
    assert sorted(os.listdir(folder)) == names and _snapshot(folder) == before
    return err


def test_inspect_writes_json_and_heatmap_and_prints_the_table(work, capsys):
    assert main(["inspect", "ties.yaml", "-o", "report"]) == 0
    out = capsys.readouterr().out
    assert "sign conflict" in out and "recommendation:" in out
    assert out.strip().splitlines()[-1].startswith("wrote report/inspection.json")
    assert sorted(os.listdir(work / "report")) == ["heatmap.png", "inspection.json"]
    assert (work / "report" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((work / "report" / "inspection.json").read_text())
    assert data["overlap_density"] == [0.5] and data["conflict_density"] == [0.5]
    assert data["sample"] == 65536
    from safetensors.torch import load_file

    states = [load_file(work / f"{n}.safetensors") for n in ("base", "a", "b")]
    total = None
    for name in NAMES:
        f = tensor_figures(
            [s[name] for s in states[1:]],
            states[0][name],
            overlap_density=0.5,
            conflict_density=0.5,
        )
        total = f if total is None else total + f
    assert data["overall"]["sign_conflict"] == pytest.approx(total.conflict)
    assert data["overall"]["cosine"][0][1] == pytest.approx(float(total.cosine[0, 1]), rel=1e-6)
    assert data["overall"]["mean_overlap"] == pytest.approx(total.mean_overlap)
    assert set(data["groups"]) == {"embeddings", "attention", "mlp", "norms"}
    assert data["groups"]["mlp"]["tensors"] == 2
    assert data["recommendation"]["method"] in out.strip().splitlines()[-1]


def test_quiet_keeps_only_the_wrote_line(work, capsys):
    assert main(["inspect", "ties.yaml", "-o", "report", "--quiet", "-j", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert len(captured.out.strip().splitlines()) == 1 and captured.out.startswith("wrote ")


def test_base_option_and_density(work, capsys):
    assert (
        main(
            [
                "inspect",
                "linear.yaml",
                "-o",
                "r",
                "--base",
                "base.safetensors",
                "--density",
                "0.1",
                "--quiet",
                "--exact",
            ]
        )
        == 0
    )
    data = json.loads((work / "r" / "inspection.json").read_text())
    assert data["overlap_density"] == [0.1] and data["conflict_density"] == [1.0]
    assert data["sample"] is None and data["overall"]["sign_entries"] == data["overall"]["entries"]
    assert data["overall"]["sign_conflict_at_overlap_density"] is not None


def test_overwrite_replaces_only_the_output(work, capsys):
    (work / "report").mkdir()
    (work / "report" / "old.txt").write_text("old")
    err = refused(["inspect", "ties.yaml", "-o", "report"], capsys, work)
    assert "already exists" in err and "--overwrite" in err
    assert main(["inspect", "ties.yaml", "-o", "report", "--overwrite", "--quiet"]) == 0
    assert sorted(os.listdir(work / "report")) == ["heatmap.png", "inspection.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "nope.yaml", "-o", "r"], "nope.yaml"),
        (["inspect", "linear.yaml", "-o", "r"], "pass --base PATH"),
        (
            ["inspect", "ties.yaml", "-o", "r", "--density", "0"],
            "--density: expected a number in (0, 1]",
        ),
        (["inspect", "ties.yaml", "-o", "."], "choose another -o"),
        (["inspect", "ties.yaml", "-o", "base.safetensors", "--overwrite"], "base.safetensors"),
        (
            ["inspect", "linear.yaml", "-o", "r", "--base", "missing.safetensors"],
            "missing.safetensors",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(work, capsys, args, message):
    err = refused(args, capsys, work)
    assert message in err


def test_a_multi_stage_file_is_refused(work, capsys):
    (work / "multi.yaml").write_text(
        "name: soup\nmerge_method: linear\nmodels: [a.safetensors, b.safetensors]\n---\n"
        "merge_method: ties\nbase_model: base.safetensors\nmodels: [soup, a.safetensors]\n"
    )
    err = refused(["inspect", "multi.yaml", "-o", "r"], capsys, work)
    assert "inspect measures one merge" in err


def test_missing_checkpoint_and_mismatched_shapes(work, capsys):
    (work / "gone.yaml").write_text(
        "merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - model: gone.safetensors\n"
    )
    assert "gone.safetensors" in refused(["inspect", "gone.yaml", "-o", "r"], capsys, work)
    save_file({n: torch.zeros(2) for n in NAMES}, work / "b.safetensors")
    assert "has shape" in refused(["inspect", "ties.yaml", "-o", "r"], capsys, work)


def test_a_non_finite_tensor_is_a_warning_naming_it(work, capsys):
    from safetensors.torch import load_file

    state = load_file(work / "a.safetensors")
    state["model.norm.weight"][1] = float("inf")
    save_file(state, work / "a.safetensors")
    assert main(["inspect", "ties.yaml", "-o", "r", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("modelfuse: warning:") == 1
    assert "model.norm.weight of a.safetensors holds NaN or inf" in err
    data = json.loads((work / "r" / "inspection.json").read_text())
    assert data["skipped_tensors"] == ["model.norm.weight"]
    assert np.isfinite(data["overall"]["sign_conflict"])
