"""What a merge writes beside the weights: a re-runnable modelfuse.yaml, a model card, config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.cli import main
from modelfuse.merge.config import load_config
from modelfuse.merge.output_files import DROPPED_CONFIG_KEYS
from modelfuse.merge.registry import METHODS
from modelfuse.statistics.storage import save as save_statistics

from .conftest import random_state


def _folder(path: Path, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    path.mkdir(parents=True)
    save_file(random_state(seed, dtype), path / "model.safetensors")
    (path / "config.json").write_text(
        json.dumps(
            {
                "_name_or_path": f"/somewhere/finetune-{seed}",
                "_commit_hash": "abc123",
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": 2,
                "torch_dtype": "float32",
                "transformers_version": "4.57.0",
                "use_cache": True,
            }
        )
    )
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """``project/`` holding a base, two fine-tunes, a patch and statistics, and a configuration
    with paths relative to it."""
    project = tmp_path / "project"
    for i, name in enumerate(["base", "math", "code"]):
        _folder(project / name, i)
    return project


CONFIG = """\
merge_method: dare_ties
base_model: base
models:
  - model: math
    parameters: {weight: 0.6, density: 0.5}
  - model: code
    parameters: {weight: [0.2, 0.8], density: 0.7}
parameters: {lambda: 1.0}
patches: [{patch: patch, scale: 0.5}]
dtype: bfloat16
"""


def test_modelfuse_yaml_merges_the_same_bytes_from_any_folder(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(inputs)
    assert main(["diff", "base", "math", "-o", "patch", "--quiet"]) == 0
    (inputs / "merge.yaml").write_text(CONFIG)
    assert main(["merge", "merge.yaml", "first", "--quiet"]) == 0
    written = (inputs / "first" / "modelfuse.yaml").read_text()
    config, _ = load_config(inputs / "first" / "modelfuse.yaml")
    assert config.base_model == str(inputs / "base")
    assert [m.model for m in config.models or []] == [str(inputs / "math"), str(inputs / "code")]
    assert (config.patches or [])[0].patch == str(inputs / "patch")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(inputs / "first" / "modelfuse.yaml"), "-o", "second", "--quiet"]) == 0
    first, second = inputs / "first", elsewhere / "second"
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (second / "modelfuse.yaml").read_text() == written
    assert (first / "README.md").read_bytes() == (second / "README.md").read_bytes()
    capsys.readouterr()


def test_model_card_names_method_inputs_parameters_and_version(inputs, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(inputs / "base"),
        "models": [
            {"model": str(inputs / "math"), "parameters": {"weight": 0.7}},
            str(inputs / "code"),
        ],
        "parameters": {"lambda": 0.9},
    }
    modelfuse.merge(config, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"modelfuse {modelfuse.__version__}" in card
    assert "`task_arithmetic`" in card
    for name in ("base", "math", "code"):
        assert str(inputs / name) in card
    assert "lambda: 0.9" in card and '{"weight": 0.7}' in card
    embedded = card.split("## Configuration")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(embedded)["merge_method"] == "task_arithmetic"

    modelfuse.merge(config, tmp_path / "plain", model_card=False)
    assert not (tmp_path / "plain" / "README.md").exists()


def test_no_model_card_flag(inputs, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(
        f"merge_method: linear\nmodels: [{inputs / 'math'}, {inputs / 'code'}]\n"
    )
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "o"), "--no-model-card", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "config.json",
        "model.safetensors",
        "modelfuse.yaml",
    ]
    capsys.readouterr()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", None])
def test_config_json_has_the_written_dtype_and_no_input_identity(inputs, tmp_path, dtype):
    config = {"merge_method": "linear", "models": [str(inputs / "math"), str(inputs / "code")]}
    if dtype is not None:
        config["out_dtype"] = dtype
    result = modelfuse.merge(config, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        stored = {handle.get_slice(n).get_dtype() for n in handle.keys() if n != "position_ids"}
    expected = {"bfloat16": "BF16", "float16": "F16", None: "F32"}[dtype]
    assert stored == {expected}
    assert written["torch_dtype"] == (dtype or "float32")
    for key in DROPPED_CONFIG_KEYS:
        assert key not in written
    kept = {"architectures", "num_hidden_layers", "transformers_version", "use_cache", "torch_dtype"}
    assert set(written) == kept
    if dtype is not None:
        assert any("torch_dtype 'float32' -> " + dtype in note for note in result.notes)


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _float8_inputs(folder: Path, dtype: torch.dtype) -> list[Path]:
    """Three float8 checkpoints (base first) and float32 copies of the same values."""
    paths = []
    for i in range(3):
        state = {
            k: (v * 0.5).to(dtype) for k, v in random_state(i).items() if v.is_floating_point()
        }
        path = folder / f"f8-{i}.safetensors"
        save_file(state, path)
        save_file({k: v.to(torch.float32) for k, v in state.items()}, folder / f"f32-{i}.safetensors")
        paths.append(path)
    return paths


def _method_config(name: str, folder: Path, prefix: str) -> dict:
    base, a, b = (str(folder / f"{prefix}-{i}.safetensors") for i in range(3))
    method = METHODS[name]
    models: list = [a, b]
    if method.statistics:
        kind = method.statistics[0]
        stats = []
        for i, model in enumerate(models):
            file = folder / f"{prefix}-{i}.{kind}.safetensors"
            tensors = {}
            for key, value in load_file(model).items():
                g = torch.Generator().manual_seed(i)
                if kind == "gram":
                    if value.dim() != 2:
                        continue
                    x = torch.randn(8, value.shape[1], generator=g)
                    tensors[key] = x.T @ x
                else:
                    tensors[key] = torch.rand(value.shape, generator=g) + 0.1
            save_statistics(tensors, file, kind=kind, n_examples=8)
            stats.append({"model": model, "statistics": str(file)})
        models = stats
    config: dict = {"merge_method": name, "models": models}
    if method.uses_base:
        config["base_model"] = base
    if name in ("passthrough", "slerp", "nearswap", "arcee_fusion"):
        config["models"] = models[:1]
    if name in ("slerp", "nearswap"):
        config["parameters"] = {"t": 0.3}
    return config


@pytest.mark.parametrize("dtype", FLOAT8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_float8_inputs_as_their_float32_values(tmp_path, method, dtype):
    _float8_inputs(tmp_path, dtype)
    f8 = modelfuse.merge(_method_config(method, tmp_path, "f8"), tmp_path / "from-f8")
    f32 = modelfuse.merge(_method_config(method, tmp_path, "f32"), tmp_path / "from-f32")
    assert (f8.out / "model.safetensors").read_bytes() == (f32.out / "model.safetensors").read_bytes()
    with safe_open(str(f8.out / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {"F32"}


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_out_dtype_float8_writes_saturated_float8(tmp_path, dtype):
    big = {"w": torch.tensor([1.0, -3.0, 1e6, -1e6, 0.1])}
    save_file(big, tmp_path / "a.safetensors")
    save_file(big, tmp_path / "b.safetensors")
    config = {
        "merge_method": "linear",
        "models": [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
        "out_dtype": dtype,
    }
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")["w"]
    torch_dtype = getattr(torch, dtype)
    assert merged.dtype == torch_dtype
    top = torch.finfo(torch_dtype).max
    expected = torch.tensor([1.0, -3.0, top, -top, 0.1]).to(torch_dtype)
    assert torch.equal(merged.to(torch.float32), expected.to(torch.float32))
