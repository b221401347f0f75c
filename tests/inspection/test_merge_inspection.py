"""inspect_merge on checkpoints written here: figures per group and layer, bounded reads,
the base, non-finite tensors, the barrier and the refusals."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelfuse.checkpoint.safetensors_format import SafetensorsCheckpoint
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.inspection import inspect_merge, tensor_figures
from modelfuse.merge.execute import NonFiniteInputWarning

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "lm_head.weight": (40, 8),
}


def _write(folder: Path, n_models: int = 2, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    states = {"base": base}
    for i in range(n_models):
        states[f"m{i}"] = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    for label, state in states.items():
        save_file(state, folder / f"{label}.safetensors")
    return states


def _config(folder: Path, method: str = "ties", n_models: int = 2, **parameters) -> dict:
    config = {
        "merge_method": method,
        "base_model": str(folder / "base.safetensors"),
        "models": [str(folder / f"m{i}.safetensors") for i in range(n_models)],
    }
    if parameters:
        config["parameters"] = parameters
    return config


def test_groups_layers_and_overall_are_sums_of_tensors(tmp_path):
    states = _write(tmp_path)
    found = inspect_merge(_config(tmp_path, density=0.5), threads=2)
    base, models = states["base"], [states["m0"], states["m1"]]

    def figures(names):
        total = None
        for name in names:
            f = tensor_figures(
                [m[name] for m in models], base[name], overlap_density=0.5, conflict_density=0.5
            )
            total = f if total is None else total + f
        return total

    attention = [n for n in SHAPES if "self_attn" in n]
    layer1 = [n for n in SHAPES if ".layers.1." in n]
    assert set(found.groups) == {"embeddings", "attention", "mlp", "norms", "head"}
    for got, names in [
        (found.groups["attention"], attention),
        (found.layers[1], layer1),
        (found.overall, list(SHAPES)),
    ]:
        want = figures(names)
        np.testing.assert_allclose(got.dots, want.dots, rtol=1e-6)
        np.testing.assert_array_equal(got.dropped, want.dropped)
        np.testing.assert_array_equal(got.shared, want.shared)
    # the whole-model cosine is that of the concatenated task vectors
    flat = [torch.cat([(m[n] - base[n]).ravel() for n in SHAPES]).double() for m in models]
    cosine = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert found.overall.cosine[0, 1] == pytest.approx(cosine, rel=1e-5)
    assert found.overlap_density == (0.5,) and found.conflict_density == (0.5,)


def test_weights_and_densities_come_from_the_configuration(tmp_path):
    states = _write(tmp_path)
    config = _config(tmp_path, density=0.3)
    config["models"][1] = {"model": config["models"][1], "parameters": {"weight": -0.5}}
    found = inspect_merge(config, density=0.1)
    base, models = states["base"], [states["m0"], states["m1"]]
    want = None
    for name in SHAPES:
        f = tensor_figures(
            [m[name] for m in models],
            base[name],
            weight=[1.0, -0.5],
            overlap_density=0.1,
            conflict_density=0.3,
        )
        want = f if want is None else want + f
    np.testing.assert_array_equal(found.overall.dropped, want.dropped)
    np.testing.assert_allclose(found.overall.share, want.share, rtol=1e-6)
    assert found.overall.trimmed_conflict == pytest.approx(want.trimmed_conflict)
    assert found.overlap_density == (0.1,) and found.conflict_density == (0.3,)


def test_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
    """With one thread, at most one tensor of each input is alive at any read (the reader's
    reads are counted and their results tracked until freed), and each is read once."""
    _write(tmp_path, n_models=3)
    alive: set[int] = set()
    most = [0]
    reads: list[str] = []
    lock = threading.Lock()
    original = SafetensorsCheckpoint.read

    def counted(self, name):
        tensor = original(self, name)
        with lock:
            reads.append(name)
            key = id(tensor)
            alive.add(key)
            most[0] = max(most[0], len(alive))
            weakref.finalize(tensor, alive.discard, key)
        return tensor

    monkeypatch.setattr(SafetensorsCheckpoint, "read", counted)
    inspect_merge(_config(tmp_path, n_models=3), threads=1)
    assert most[0] <= 4  # the base and three models: one tensor each
    assert sorted(reads) == sorted(name for name in SHAPES for _ in range(4))


def test_a_base_for_a_method_without_one(tmp_path):
    _write(tmp_path)
    config = _config(tmp_path, method="linear")
    base = config.pop("base_model")
    with pytest.raises(ConfigError, match="add base_model: PATH .* or pass --base PATH"):
        inspect_merge(config)
    found = inspect_merge(config, base=base)
    reference = inspect_merge(_config(tmp_path, method="task_arithmetic"))
    np.testing.assert_allclose(found.overall.dots, reference.overall.dots, rtol=1e-6)
    # a base_model that linear ignores is used too
    config["base_model"] = base
    assert inspect_merge(config).base == base


def test_a_base_of_other_shapes_is_refused(tmp_path):
    _write(tmp_path)
    save_file({n: torch.zeros(3) for n in SHAPES}, tmp_path / "other.safetensors")
    config = _config(tmp_path, method="linear")
    config.pop("base_model")
    with pytest.raises(CheckpointError, match=r"has shape \[3\] in the base .* \(and 4 more\)"):
        inspect_merge(config, base=tmp_path / "other.safetensors")


def test_non_finite_tensors_are_named_and_left_out(tmp_path):
    states = _write(tmp_path)
    bad = dict(states["m1"])
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"].clone()
    bad["model.layers.0.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(bad, tmp_path / "m1.safetensors")
    with pytest.warns(NonFiniteInputWarning, match=r"up_proj.weight of .*m1.safetensors holds NaN"):
        found = inspect_merge(_config(tmp_path))
    assert found.skipped == ("model.layers.0.mlp.up_proj.weight",)
    assert found.overall.tensors == len(SHAPES) - 1
    assert np.isfinite(found.overall.dots).all()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("missing model", CheckpointError, "no such file or folder"),
        ("shape", CheckpointError, "has shape"),
        ("slices", ConfigError, "slices: inspect compares whole models"),
        ("density 0", ConfigError, "density: expected a number in"),
    ],
)
def test_bad_inputs_are_refused_before_reading(tmp_path, monkeypatch, change, error, message):
    _write(tmp_path)
    config = _config(tmp_path)
    density = None
    if change == "missing model":
        config["models"][0] = str(tmp_path / "nope.safetensors")
    elif change == "shape":
        save_file({n: torch.zeros(2, 2) for n in SHAPES}, tmp_path / "m1.safetensors")
    elif change == "slices":
        config = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": config["base_model"], "layer_range": [0, 2]}]}],
        }
    else:
        density = 0.0
    reads = []
    monkeypatch.setattr(SafetensorsCheckpoint, "read", lambda self, name: reads.append(name))
    with pytest.raises(error, match=message):
        inspect_merge(config, density=density)
    assert reads == []


def test_barrier_with_a_loss(tmp_path):
    states = _write(tmp_path)

    def loss(state):  # concave: the barrier between a and b is |a - b|^2 / 4
        return -sum(float((t.double() ** 2).sum()) for t in state.values())

    found = inspect_merge(_config(tmp_path), loss=loss, alphas=5)
    (barrier,) = found.barriers
    distance = sum(float(((states["m0"][n] - states["m1"][n]).double() ** 2).sum()) for n in SHAPES)
    assert barrier.barrier == pytest.approx(distance / 4, rel=1e-5)
    assert barrier.alpha == 0.5
    assert found.to_dict()["barriers"][0]["barrier"] == pytest.approx(distance / 4, rel=1e-5)
    with pytest.raises(ConfigError, match="pairs: 'm7' is not a model of the configuration"):
        inspect_merge(_config(tmp_path), loss=loss, pairs=[("base", "m7")])


def test_to_dict_holds_every_figure(tmp_path):
    _write(tmp_path)
    found = inspect_merge(_config(tmp_path))
    data = found.to_dict()
    assert set(data["overall"]) >= {
        "norm",
        "cosine",
        "mean_cosine",
        "sign_conflict",
        "overlap",
        "mean_overlap",
        "share",
    }
    assert data["overall"]["cosine"][0][1] == pytest.approx(float(found.overall.cosine[0, 1]))
    assert set(data["layers"]) == {"0", "1"}
    assert data["recommendation"]["method"] == found.recommendation.method


def test_sampled_tensors_are_streamed_in_blocks_of_rows(tmp_path, monkeypatch):
    """Tensors above the sample size are read by rows (never whole) and give the figures of
    tensor_figures with the same sample; smaller ones are read whole."""
    states = _write(tmp_path)
    whole: list[str] = []
    blocks: list[tuple[str, int, int]] = []
    read, read_rows = SafetensorsCheckpoint.read, SafetensorsCheckpoint.read_rows

    def counted_read(self, name):
        whole.append(name)
        return read(self, name)

    def counted_rows(self, name, start, stop):
        blocks.append((name, start, stop))
        return read_rows(self, name, start, stop)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", counted_read)
    monkeypatch.setattr(SafetensorsCheckpoint, "read_rows", counted_rows)
    monkeypatch.setattr("modelfuse.inspection.measuring.READ_BLOCK", 64)
    found = inspect_merge(_config(tmp_path, density=0.5), sample=50, threads=1)
    large = {n for n, s in SHAPES.items() if np.prod(s) > 50}
    assert set(whole) == set(SHAPES) - large
    assert {name for name, _, _ in blocks} == large
    assert max(stop - start for _, start, stop in blocks) == 8  # 64 entries of rows of 8
    base, models = states["base"], [states["m0"], states["m1"]]
    want = None
    for name in SHAPES:
        f = tensor_figures(
            [m[name] for m in models],
            base[name],
            overlap_density=0.5,
            conflict_density=0.5,
            sample=50,
        )
        want = f if want is None else want + f
    np.testing.assert_allclose(found.overall.dots, want.dots, rtol=1e-6)
    np.testing.assert_array_equal(found.overall.dropped, want.dropped)
    np.testing.assert_array_equal(found.overall.shared, want.shared)
    assert found.overall.signed_entries == want.signed_entries < want.entries


def test_a_non_finite_streamed_tensor_is_named(tmp_path):
    states = _write(tmp_path)
    bad = dict(states["base"])
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][39, 7] = float("inf")
    save_file(bad, tmp_path / "base.safetensors")
    with pytest.warns(NonFiniteInputWarning, match=r"lm_head.weight of the base holds NaN"):
        found = inspect_merge(_config(tmp_path), sample=50)
    assert found.skipped == ("lm_head.weight",)


def test_threads_give_the_same_figures_to_the_bit(tmp_path):
    # the largest tensors are measured first on several threads; sums keep the tensors' order
    _write(tmp_path, n_models=3)
    one = inspect_merge(_config(tmp_path, n_models=3, density=0.5), sample=50, threads=1)
    three = inspect_merge(_config(tmp_path, n_models=3, density=0.5), sample=50, threads=3)
    first, second = one.to_dict(), three.to_dict()
    first.pop("seconds"), second.pop("seconds")
    assert first == second
