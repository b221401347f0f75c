"""Task-vector patches: ``modelfuse diff`` and ``patches:`` in a configuration."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.cli import main
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge.patch import PatchSource, diff_checkpoints

from .conftest import random_state


def _save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file(state, path)
    return path


def test_dense_patch_is_the_difference(tmp_path):
    a, b = random_state(0), random_state(1)
    pa, pb = _save(tmp_path, "a", a), _save(tmp_path, "b", b)
    result = diff_checkpoints(pa, pb, tmp_path / "patch")
    patch = PatchSource(tmp_path / "patch")
    assert set(patch.keys()) == {k for k, v in a.items() if v.is_floating_point()}
    for name in patch.keys():
        torch.testing.assert_close(patch.read(name), b[name] - a[name])
    assert result.kept == result.total


def test_sparse_patch_keeps_the_largest_entries_in_a_smaller_dtype(tmp_path):
    a, b = random_state(0), random_state(1)
    pa, pb = _save(tmp_path, "a", a), _save(tmp_path, "b", b)
    diff_checkpoints(pa, pb, tmp_path / "patch", density=0.25, dtype="bfloat16")
    patch = PatchSource(tmp_path / "patch")
    for name in patch.keys():
        delta = (b[name] - a[name]).reshape(-1)
        k = int(0.25 * delta.numel())
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[torch.argsort(delta.abs(), descending=True, stable=True)[:k]] = True
        expected = torch.where(keep, delta, torch.zeros(())).to(torch.bfloat16)
        got = patch.read(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.reshape(-1), expected, atol=0, rtol=0)
    stored = load_file(tmp_path / "patch" / "model.safetensors")
    assert "model.layers.0.mlp.weight::indices" in stored
    assert "model.layers.0.mlp.weight" not in stored


def test_patches_add_scale_and_remove(tmp_path):
    clean, robust, other = random_state(0), random_state(1), random_state(2)
    pc, pr, po = (_save(tmp_path, n, s) for n, s in [("c", clean), ("r", robust), ("o", other)])
    diff_checkpoints(pc, pr, tmp_path / "p1")
    diff_checkpoints(pc, po, tmp_path / "p2")
    config = {
        "merge_method": "linear",
        "models": [str(pc)],
        "patches": [{"patch": str(tmp_path / "p1"), "scale": 0.5},
                    {"patch": str(tmp_path / "p2"), "scale": -1.0}],
    }
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in clean.items():
        if not value.is_floating_point():
            assert torch.equal(merged[name], value)
            continue
        expected = value + 0.5 * (robust[name] - value) - (other[name] - value)
        torch.testing.assert_close(merged[name], expected)


def test_patch_that_does_not_fit(tmp_path):
    a, b = random_state(0), random_state(1)
    b["model.norm.weight"] = torch.zeros(5)
    a["model.norm.weight"] = torch.zeros(5)
    diff_checkpoints(_save(tmp_path, "a", a), _save(tmp_path, "b", b), tmp_path / "p")
    model = _save(tmp_path, "m", random_state(2))
    config = {"merge_method": "linear", "models": [str(model)], "patches": [{"patch": str(tmp_path / "p")}]}
    with pytest.raises(CheckpointError, match="model.norm.weight has shape \\[5\\] in patch"):
        modelfuse.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_density(tmp_path):
    a = _save(tmp_path, "a", random_state(0))
    with pytest.raises(ConfigError, match="density"):
        diff_checkpoints(a, a, tmp_path / "p", density=0.0)


def test_diff_command(tmp_path, capsys):
    pa, pb = _save(tmp_path, "a", random_state(0)), _save(tmp_path, "b", random_state(1))
    code = main(["diff", str(pa), str(pb), "-o", str(tmp_path / "p"), "--density", "0.5", "--quiet"])
    assert code == 0
    assert "50.0% of entries kept" in capsys.readouterr().out
    assert main(["diff", str(pa), str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "q")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
