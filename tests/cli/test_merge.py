"""``modelfuse merge`` and ``modelfuse methods`` through the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main

RUN = [sys.executable, "-c", "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))"]


def _models(tmp_path: Path, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"layers.0.w": torch.full((3,), float(i)), "head": torch.ones(2) * i}, path)
        paths.append(path)
    return paths


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_merge_writes_model_and_prints_summary(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1}}\n",
    )
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "merged 2 tensors" in out and "peak memory" in out
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(merged["layers.0.w"], torch.full((3,), 0.25))


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: linear" in out and "layers.0.w [3] float32 merge" in out
    assert not (tmp_path / "out").exists()


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: ties_plus\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelfuse: error:") and "ties_plus" in err and "valid methods" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_not_yaml(tmp_path, capsys):
    config = _yaml(tmp_path, "merge_method: [linear\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    (tmp_path / "out").mkdir()
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0


def test_bad_shard_size(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    args = ["merge", str(config), str(tmp_path / "out"), "--quiet", "--shard-size", "lots"]
    assert main(args) == 2
    assert "lots" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_methods_lists_parameters_from_the_declaration(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "linear" in listing and "task_arithmetic" in listing
    assert main(["methods", "task_arithmetic"]) == 0
    detail = capsys.readouterr().out
    assert "lambda" in detail and "per model" in detail and "base model: required" in detail
    assert main(["methods", "nope"]) == 2


def test_subprocess_end_to_end(tmp_path):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    done = subprocess.run(
        [*RUN, "merge", str(config), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "merged 2 tensors" in done.stdout
    failed = subprocess.run(
        [*RUN, "merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"modelfuse: error: {tmp_path / 'missing.yaml'}: no such configuration file; "
        "give the path of a YAML file"
    ]
