"""mergekit's MODEL+LORA model references: the model with a PEFT LoRA adapter applied.

The reference for every merge is the same merge of a folder holding the adapted
model's tensors written out (what mergekit merges after applying the adapter
into its cache); how each tensor is adapted is tested against PEFT in
tests/checkpoint/test_adapted.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modelfuse.checkpoint.adapted import open_adapted
from modelfuse.cli import main
from modelfuse.merge import merge
from modelfuse.merge.multistage import merge_multistage

from .conftest import tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m0, m1 (tiny Llamas), lora (an adapter of m0's architecture) and adapted (m0 with
    lora applied, written out as a model folder)."""
    root = tmp_path_factory.mktemp("lora-references")
    for i in range(2):
        tiny_llama(seed=i).save_pretrained(root / f"m{i}", safe_serialization=True)
    wrapped = peft.get_peft_model(
        tiny_llama(seed=0),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    wrapped.save_pretrained(root / "lora")
    adapted = root / "adapted"
    shutil.copytree(root / "m0", adapted)
    with open_adapted(root / "m0", root / "lora") as ckpt:
        save_file({k: ckpt.read(k) for k in ckpt.keys()}, adapted / "model.safetensors")
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_model_plus_lora_merges_the_adapted_model(models, tmp_path, monkeypatch):
    # written as mergekit users write it, relative to the file, run from another folder
    text = (
        "merge_method: linear\n"
        "models:\n"
        "  - {model: m0+lora, parameters: {weight: 0.3}}\n"
        "  - {model: m1, parameters: {weight: 0.7}}\n"
    )
    (models / "plus.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(models / "plus.yaml"), "out", "--quiet"]) == 0
    reference = text.replace("m0+lora", str(models / "adapted")).replace(" m1,", f" {models / 'm1'},")
    merge(yaml.safe_load(reference), "ref")
    _same(tmp_path / "out", tmp_path / "ref")
    # the adapter really changes the merge
    assert not torch.equal(
        _weights(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"],
        load_file(models / "m0" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"] * 0.3
        + load_file(models / "m1" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"] * 0.7,
    )
    # the record names both parts by their absolute paths and merges again to the same bytes
    record = yaml.safe_load((tmp_path / "out" / "modelfuse.yaml").read_text())
    assert record["models"][0]["model"] == f"{models / 'm0'}+{models / 'lora'}"
    assert main(["merge", str(tmp_path / "out" / "modelfuse.yaml"), "again", "--quiet"]) == 0
    _same(tmp_path / "out", tmp_path / "again")


def test_a_base_model_plus_lora_in_a_task_vector_merge(models, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": f"{models / 'm0'}+{models / 'lora'}",
        "models": [{"model": str(models / "m1"), "parameters": {"density": 0.5, "weight": 1.0}}],
    }
    merge(config, tmp_path / "out")
    merge({**config, "base_model": str(models / "adapted")}, tmp_path / "ref")
    _same(tmp_path / "out", tmp_path / "ref")


def test_a_stage_plus_lora_in_a_multistage_file(models, tmp_path):
    text = (
        "name: soup\nmerge_method: linear\nmodels: [m0, m1]\n---\n"
        "merge_method: linear\nmodels: [soup+lora, m1]\n"
    )
    (models / "stages.yaml").write_text(text)
    result = merge_multistage(models / "stages.yaml", tmp_path / "out")
    merge({"merge_method": "linear", "models": [str(models / "m0"), str(models / "m1")]},
          tmp_path / "soup")
    second = {"merge_method": "linear",
              "models": [f"{tmp_path / 'soup'}+{models / 'lora'}", str(models / "m1")]}
    merge(second, tmp_path / "ref")
    _same(result.out, tmp_path / "ref")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("m0+missing", "'missing' is not found (read as MODEL+LORA"),
        ("m0+lora+lora", "neither a path nor MODEL+LORA"),
        ("m0+m1", "no adapter_config.json"),
    ],
)
def test_bad_model_plus_lora_references_are_one_line(models, tmp_path, capsys, reference, message):
    # the parts are found beside the file, as every model reference is
    config = models / "bad.yaml"
    config.write_text(f"merge_method: linear\nmodels: [{reference}, m1]\n")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()
