"""float8 checkpoints (F8_E4M3, F8_E5M2): every method merges them as it merges their float32 values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_testing import assert_same, bits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.checkpoint import open_checkpoint
from modelfuse.checkpoint.dtypes import count_nonfinite_float8
from modelfuse.cli import main
from modelfuse.errors import CheckpointError

METHODS = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.7},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.6, "random_seed": 3},
    "slerp": {"t": 0.3},
    "model_stock": {},
}
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _states(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """A base and two fine-tunes near it, already rounded to ``dtype``."""
    g = torch.Generator().manual_seed(0)
    base = {
        "layer.weight": torch.randn(16, 8, generator=g),
        "layer.bias": torch.randn(8, generator=g),
    }
    states = [base]
    for _ in range(2):
        states.append({k: v + 0.25 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return [{k: v.to(dtype) for k, v in s.items()} for s in states]


def _save(folder: Path, states: list[dict[str, torch.Tensor]], widen: bool) -> list[Path]:
    folder.mkdir()
    paths = []
    for name, state in zip(["base", "a", "b"], states):
        path = folder / f"{name}.safetensors"
        save_file({k: v.to(torch.float32) if widen else v for k, v in state.items()}, str(path))
        paths.append(path)
    return paths


def _config(method: str, paths: list[Path]) -> dict[str, object]:
    base, *models = paths
    if method == "slerp":
        models = models[:1]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [str(m) for m in models],
        "parameters": METHODS[method],
    }


def test_float8_codes_are_read_as_the_safetensors_library_reads_them(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(5).to(torch.float8_e4m3fn),
        "b": torch.randn(5).to(torch.float8_e5m2),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    header = path.read_bytes()
    assert b'"F8_E4M3"' in header and b'"F8_E5M2"' in header
    with open_checkpoint(path) as ckpt, safe_open(str(path), "pt") as reference:
        for name in tensors:
            assert_same(ckpt.read(name), reference.get_tensor(name))


@pytest.mark.parametrize("written", ["float32", "float8"])
@pytest.mark.parametrize("dtype", FLOAT8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_merges_float8_as_its_float32_values(
    tmp_path: Path, method: str, dtype: torch.dtype, written: str
) -> None:
    """Merged from float8 = merged from the same values in float32 (then cast, for float8 out)."""
    states = _states(dtype)
    low = _save(tmp_path / "f8", states, widen=False)
    wide = _save(tmp_path / "f32", states, widen=True)
    config = _config(method, low)
    if written == "float8":
        config["out_dtype"] = str(dtype).removeprefix("torch.")
    merged = modelfuse.merge(config, tmp_path / "out8", threads=2)
    reference = modelfuse.merge(_config(method, wide), tmp_path / "out32", threads=2)
    assert merged.warnings == [] and reference.warnings == []
    got = load_file(tmp_path / "out8" / "model.safetensors")
    expected = load_file(tmp_path / "out32" / "model.safetensors")
    assert sorted(got) == sorted(expected) == ["layer.bias", "layer.weight"]
    for name, tensor in expected.items():
        assert tensor.dtype == torch.float32
        if written == "float8":
            assert got[name].dtype == dtype
            assert bits(got[name]) == bits(tensor.to(dtype)), name
        else:
            assert_same(got[name], tensor)
        # the merge did something: the result is none of the inputs
        assert all(not torch.equal(tensor, s[name].to(torch.float32)) for s in states)


@pytest.mark.parametrize("dtype", FLOAT8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_float8_input_is_refused(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    states = _states(dtype)
    value = torch.tensor([bad]).to(dtype)
    if dtype == torch.float8_e4m3fn and bad == float("inf"):
        value = torch.tensor([0x7F], dtype=torch.uint8).view(dtype)  # e4m3fn has no inf: NaN bits
    states[2]["layer.weight"][3, 4] = value[0]
    assert count_nonfinite_float8(states[2]["layer.weight"]) == 1
    paths = _save(tmp_path / "f8", states, widen=False)
    with pytest.raises(CheckpointError) as caught:
        modelfuse.merge(_config("linear", paths), tmp_path / "out")
    message = str(caught.value)
    name = str(dtype).removeprefix("torch.")
    assert message.startswith(f"{paths[2]}: tensor 'layer.weight' ({name}) holds 1 NaN or inf")
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_nonfinite_float8_through_the_cli(tmp_path: Path, capsys) -> None:
    states = _states(torch.float8_e4m3fn)
    states[1]["layer.bias"][0] = torch.tensor(float("nan")).to(torch.float8_e4m3fn)
    paths = _save(tmp_path / "in", states, widen=False)
    config = tmp_path / "merge.yaml"
    models = ", ".join(str(p) for p in paths[1:])
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {paths[0]}\nmodels: [{models}]\n"
    )
    before = {p: p.read_bytes() for p in [*paths, config]}
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"modelfuse: error: {paths[1]}: tensor 'layer.bias'")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "merge.yaml"]


def test_float8_merge_through_the_cli_with_an_explicit_output_dtype(tmp_path: Path, capsys) -> None:
    states = _states(torch.float8_e5m2)
    paths = _save(tmp_path / "in", states, widen=False)
    config = tmp_path / "merge.yaml"
    models = ", ".join(str(p) for p in paths[1:])
    config.write_text(
        f"merge_method: ties\nbase_model: {paths[0]}\nmodels: [{models}]\n"
        "parameters: {density: 0.5}\nout_dtype: bfloat16\n"
    )
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    wide = _save(tmp_path / "wide", states, widen=True)
    reference = modelfuse.merge(
        {**_config("ties", wide), "parameters": {"density": 0.5}}, tmp_path / "ref"
    )
    expected = load_file(reference.out / "model.safetensors")
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.bfloat16
        assert bits(merged[name]) == bits(tensor.to(torch.bfloat16))
