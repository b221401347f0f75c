"""``modelfuse extract-lora`` through the command line: output, --quiet, ranges and bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base/ (a model folder) and tuned.safetensors: fc gets singular values 3, 2, 1 added,
    and a norm changes."""
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(5, 4, generator=g), "norm.weight": torch.ones(4)}
    u, _ = torch.linalg.qr(torch.randn(5, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(4, 3, generator=g))
    delta = (u * torch.tensor([3.0, 2.0, 1.0])) @ v.T
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file({"fc.weight": base["fc.weight"] + delta, "norm.weight": torch.full((4,), 2.0)},
              tmp_path / "tuned.safetensors")
    save_file({"fc.weight": torch.zeros(5, 5), "norm.weight": torch.ones(4)},
              tmp_path / "wide.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(args: list[str], capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    before, names = _snapshot(folder), sorted(os.listdir(folder))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    assert sorted(os.listdir(folder)) == names and _snapshot(folder) == before
    return err


@pytest.mark.parametrize("out", [["lora"], ["-o", "lora"]], ids=["OUT", "-o OUT"])
def test_rank_1_writes_the_adapter_and_reports_the_error(work, capsys, out: list[str]) -> None:
    assert main(["extract-lora", "base", "tuned.safetensors", *out, "--rank", "1"]) == 0
    captured = capsys.readouterr()
    # the norm changed and cannot be factored: stored whole, said on stderr, once
    assert captured.err.count("modelfuse: ") == 1 and "modules_to_save: norm" in captured.err
    expected = math.sqrt(4 + 1) / math.sqrt(9 + 4 + 1)  # Eckart-Young with s = 3, 2, 1
    assert f"relative error max {expected:.3g}, mean {expected:.3g}" in captured.out
    assert "fc" in captured.out and "rank" in captured.out  # the per-module table
    assert captured.out.strip().splitlines()[-1].startswith(
        "wrote a LoRA adapter of 1 low-rank modules (rank 1"
    )
    assert "and 1 whole modules" in captured.out
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["target_modules"] == ["fc"]
    assert config["modules_to_save"] == ["norm"]
    assert config["base_model_name_or_path"] == "base"
    stored = load_file(work / "lora" / "adapter_model.safetensors")
    assert stored["base_model.model.fc.lora_A.weight"].shape == (1, 4)
    assert stored["base_model.model.fc.lora_B.weight"].shape == (5, 1)


def test_quiet_energy_keeps_the_final_line_only(work, capsys) -> None:
    argv = ["extract-lora", "base", "tuned.safetensors", "-o", "lora", "--energy", "0.9", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [captured.out.strip()]
    # 13/14 >= 0.9
    assert captured.out.startswith("wrote a LoRA adapter of 1 low-rank modules (rank 2;")
    assert "modules_to_save: norm" in captured.err  # notes still go to stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "0"], "--rank"),
        (["--energy", "1.5"], "--energy"),
        (["--energy", "0"], "--energy: expected a fraction in (0, 1], got 0"),
        ([], "expected --rank, --energy or both"),
        (["--rank", "two"], "--rank"),
        (["--rank", "2", "--embeddings", "maybe"], "--embeddings: unknown 'maybe'; expected one of"),
        (["--rank", "2", "--embeddings"], "--embeddings"),
    ],
)
def test_bad_numbers_are_usage_errors(work, capsys, extra: list[str], message: str) -> None:
    err = refused(["extract-lora", "base", "tuned.safetensors", "-o", "lora", *extra], capsys, work)
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["base", "base", "-o", "lora", "--rank", "2"], "the task vector is zero"),
        (["base", "wide.safetensors", "-o", "lora", "--rank", "2"],
         "fc.weight has shape [5, 4] in the base but [5, 5]"),
        (["base", "missing", "-o", "lora", "--rank", "2"], "missing"),
        (["base", "tuned.safetensors", "-o", "base", "--rank", "2", "--overwrite"],
         "is the base checkpoint"),
        (["base", "tuned.safetensors", "-o", "tuned.safetensors", "--rank", "2", "--overwrite"],
         "is the fine-tuned checkpoint"),
        (["base", "tuned.safetensors", "-o", ".", "--rank", "2", "--overwrite"], "contains"),
        (["base", "tuned.safetensors", "-o", "wide.safetensors", "--rank", "2"], "already exists"),
        (["base", "tuned.safetensors", "--rank", "2"],
         "missing the adapter folder: modelfuse extract-lora BASE FINETUNED OUT (or -o/--out OUT)"),
        (["base", "tuned.safetensors", "lora", "-o", "lora2", "--rank", "2"],
         "give the adapter folder once"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(work, capsys, argv: list[str], message: str) -> None:
    err = refused(["extract-lora", *argv], capsys, work)
    assert message in err, err


def test_overwrite_replaces_a_previous_adapter(work, capsys) -> None:
    assert main(["extract-lora", "base", "tuned.safetensors", "-o", "lora", "--rank", "1", "--quiet"]) == 0
    capsys.readouterr()
    refused(["extract-lora", "base", "tuned.safetensors", "-o", "lora", "--rank", "3"], capsys, work)
    argv = ["extract-lora", "base", "tuned.safetensors", "-o", "lora", "--rank", "3", "--overwrite"]
    assert main([*argv, "--quiet"]) == 0
    assert json.loads((work / "lora" / "adapter_config.json").read_text())["r"] == 3
    assert not [p for p in os.listdir(work) if p.startswith(".")]  # no staging folder left


def test_embeddings_whole_factored_or_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    table = torch.zeros(10, 4)
    save_file({"embed_tokens.weight": table, "fc.weight": torch.zeros(3, 4)}, tmp_path / "a.safetensors")
    change = torch.outer(torch.arange(10.0), torch.ones(4))
    save_file({"embed_tokens.weight": table + change, "fc.weight": torch.ones(3, 4)},
              tmp_path / "b.safetensors")
    assert main(["extract-lora", "a.safetensors", "b.safetensors", "-o", "plain", "--rank", "1"]) == 0
    assert "modules_to_save: embed_tokens" in capsys.readouterr().err
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc"] and config["modules_to_save"] == ["embed_tokens"]
    stored = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert torch.equal(stored["base_model.model.embed_tokens.weight"], table + change)
    argv = ["extract-lora", "a.safetensors", "b.safetensors", "-o", "skip", "--rank", "1"]
    assert main([*argv, "--embeddings", "skip"]) == 0
    assert "embed_tokens.weight" in capsys.readouterr().err  # named as left out
    config = json.loads((tmp_path / "skip" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc"] and config["modules_to_save"] is None
    argv = ["extract-lora", "a.safetensors", "b.safetensors", "-o", "emb", "--rank", "1",
            "--embeddings", "lora"]
    assert main(argv) == 0
    assert capsys.readouterr().err.count("modelfuse:") == 0
    config = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "fc"]
    stored = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    # PEFT's embedding layout: (B @ A).T is the change of the (vocab, dim) table
    product = stored["base_model.model.embed_tokens.lora_embedding_B"] @ stored[
        "base_model.model.embed_tokens.lora_embedding_A"
    ]
    torch.testing.assert_close(product.T, change, atol=1e-5, rtol=0)


def test_skip_undecomposable_leaves_the_norm_out(work, capsys) -> None:
    argv = ["extract-lora", "base", "tuned.safetensors", "-o", "lora", "--rank", "3"]
    assert main([*argv, "--skip-undecomposable", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "norm.weight" in captured.err and "not stored" in captured.err
    assert json.loads((work / "lora" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert sorted(load_file(work / "lora" / "adapter_model.safetensors")) == [
        "base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"
    ]


def test_mergekit_extract_lora_spellings(work, capsys) -> None:
    # mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank R ...
    argv = ["extract-lora", "--model", "tuned.safetensors", "--base-model", "base",
            "--out-path", "lora", "--max-rank", "3", "--sv-epsilon", "1.5", "--embed-lora",
            "--no-distribute-scale", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "--no-distribute-scale is mergekit's" in captured.err
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2  # singular values 3, 2, 1: the two above 1.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["base", "tuned.safetensors", "lora", "--base-model", "base", "--rank", "1"],
         "give the base checkpoint once"),
        (["base", "--out-path", "lora", "--rank", "1"], "missing the fine-tuned checkpoint"),
        (["base", "tuned.safetensors", "lora", "--out-path", "x", "--rank", "1"],
         "give the adapter folder once"),
        (["base", "tuned.safetensors", "lora", "--rank", "1", "--embeddings", "skip", "--embed-lora"],
         "--embeddings skip and --embed-lora disagree"),
        (["base", "tuned.safetensors", "lora", "--rank", "1", "-e", "("], "--exclude-regex: '('"),
        (["base", "tuned.safetensors", "lora", "--rank", "1", "-i", "nothing"], "leave out all 1"),
        (["base", "tuned.safetensors", "lora", "--rank", "1", "--sv-epsilon", "-1"], "--sv-epsilon"),
    ],
)
def test_bad_mergekit_spellings_are_one_line(work, capsys, argv, message) -> None:
    err = refused(["extract-lora", *argv], capsys, work)
    assert message in err, err
