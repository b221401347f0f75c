"""The streaming file merge, end to end, against formulas written out here."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.errors import CheckpointError, ConfigError, OutputError
from modelfuse.merge.engine import describe_plan, plan_merge

from .conftest import random_state, tiny_llama


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_linear_merge_of_llama_folders_sharded_and_loadable(llama_folders, tmp_path):
    from transformers import LlamaForCausalLM

    weights = [0.5, 0.3, 0.2]
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(f), "parameters": {"weight": w}} for f, w in zip(llama_folders, weights)
        ],
    }
    out = tmp_path / "merged"
    result = modelfuse.merge(config, out, shard_size="40KB", threads=2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert (out / "config.json").is_file() and (out / "modelfuse.yaml").is_file()
    inputs = [load_file(f / "model.safetensors") for f in llama_folders]
    seen = set()
    for shard in shards:
        with safe_open(out / shard, framework="pt") as handle:
            for name in handle.keys():
                expected = sum(w * sd[name] for w, sd in zip(weights, inputs)) / sum(weights)
                torch.testing.assert_close(handle.get_tensor(name), expected)
                seen.add(name)
    assert seen == set(inputs[0]) == set(index["weight_map"])
    assert result.tensors == len(seen)
    assert index["metadata"]["total_size"] == result.bytes

    merged = LlamaForCausalLM.from_pretrained(out).eval()
    reference = tiny_llama(seed=0)
    reference.load_state_dict(
        {k: sum(w * sd[k] for w, sd in zip(weights, inputs)) / sum(weights) for k in inputs[0]},
        strict=False,
    )
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits)


def _write(path: Path, state: dict[str, torch.Tensor], fmt: str) -> Path:
    if fmt == "safetensors":
        save_file(state, path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    if fmt == "bin":
        torch.save(state, path.with_suffix(".bin"))
        return path.with_suffix(".bin")
    if fmt == "nested-pt":
        torch.save({"epoch": 3, "state_dict": state}, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "nested-pt"])
def test_task_arithmetic_bf16_every_format(tmp_path, fmt):
    states = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = [_write(tmp_path / f"m{i}", sd, fmt) for i, sd in enumerate(states)]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [
            {"model": str(paths[1]), "parameters": {"weight": 0.7}},
            {"model": str(paths[2]), "parameters": {"weight": -0.4}},
        ],
        "parameters": {"lambda": 1.5},
    }
    out = tmp_path / "out"
    modelfuse.merge(config, out, threads=1)
    merged = load_file(out / "model.safetensors")
    for name, base in states[0].items():
        if not base.is_floating_point():
            assert torch.equal(merged[name], base)
            continue
        b, a, c = (s[name].float() for s in states)
        expected = (b + 1.5 * (0.7 * (a - b) - 0.4 * (c - b))).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], expected, atol=0, rtol=0)


def test_dtype_and_out_dtype(tmp_path):
    states = [random_state(i) for i in range(2)]
    paths = [_write(tmp_path / f"m{i}", sd, "safetensors") for i, sd in enumerate(states)]
    config = {
        "merge_method": "linear",
        "models": [str(p) for p in paths],
        "dtype": "float16",
        "out_dtype": "bfloat16",
    }
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.mlp.weight"
    halves = [s[name].to(torch.float16).float() for s in states]
    expected = ((halves[0] + halves[1]) / 2).to(torch.bfloat16)
    torch.testing.assert_close(merged[name], expected, atol=0, rtol=0)


def test_threads_do_not_change_the_result(tmp_path):
    paths = [_write(tmp_path / f"m{i}", random_state(i), "safetensors") for i in range(3)]
    config = {"merge_method": "linear", "models": [str(p) for p in paths]}
    modelfuse.merge(config, tmp_path / "one", threads=1)
    modelfuse.merge(config, tmp_path / "two", threads=2)
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    two = (tmp_path / "two" / "model.safetensors").read_bytes()
    assert one == two


def test_yaml_file_with_relative_paths_and_record(tmp_path, monkeypatch):
    for i in range(2):
        _write(tmp_path / f"m{i}", random_state(i), "safetensors")
    (tmp_path / "soup.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: m0.safetensors\n  - model: m1.safetensors\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # relative paths fall back to the YAML's folder
    out = tmp_path / "out"
    modelfuse.merge(tmp_path / "soup.yaml", out)
    record = (out / "modelfuse.yaml").read_text()
    assert f"modelfuse_version: {modelfuse.__version__}" in record
    assert "merge_method: linear" in record


def test_dry_run_plan_describes_every_tensor(tmp_path):
    paths = [_write(tmp_path / f"m{i}", random_state(i), "safetensors") for i in range(2)]
    config = {
        "merge_method": "linear",
        "models": [{"model": str(paths[0]), "parameters": {"weight": [1.0, 0.0]}}, str(paths[1])],
    }
    plan = plan_merge(config)
    text = describe_plan(plan)
    assert "model.layers.1.mlp.weight [4, 4] float32 merge (layer position 1.000) normalize=True, weight=[0, 1]" in text
    assert "position_ids [6] int64 copy" in text
    assert not (tmp_path / "out").exists()


# ---- bad input: one message naming the culprit, and nothing left at OUT ----


def _config(paths, method="linear", **extra):
    return {"merge_method": method, "models": [str(p) for p in paths], **extra}


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_missing_model_file(tmp_path):
    good = _write(tmp_path / "m0", random_state(0), "safetensors")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        modelfuse.merge(_config([good, tmp_path / "nothere.safetensors"]), out)
    _assert_nothing_written(tmp_path, out)


def test_hub_reference_is_not_downloaded(tmp_path):
    good = _write(tmp_path / "m0", random_state(0), "safetensors")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not download"):
        modelfuse.merge(_config([good, "meta-llama/Llama-2-7b-hf"]), out)
    _assert_nothing_written(tmp_path, out)


def test_not_a_checkpoint(tmp_path):
    good = _write(tmp_path / "m0", random_state(0), "safetensors")
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are my notes, not weights")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        modelfuse.merge(_config([good, bad]), out)
    _assert_nothing_written(tmp_path, out)


def test_truncated_safetensors(tmp_path):
    good = _write(tmp_path / "m0", random_state(0), "safetensors")
    cut = _write(tmp_path / "m1", random_state(1), "safetensors")
    cut.write_bytes(cut.read_bytes()[:-10])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="m1.safetensors"):
        modelfuse.merge(_config([good, cut]), out)
    _assert_nothing_written(tmp_path, out)


def test_header_length_past_end_of_file(tmp_path):
    good = _write(tmp_path / "m0", random_state(0), "safetensors")
    bad = tmp_path / "m1.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="m1.safetensors"):
        modelfuse.merge(_config([good, bad]), out)
    _assert_nothing_written(tmp_path, out)


def test_shape_mismatches_all_listed(tmp_path):
    a, b = random_state(0), random_state(1)
    b["model.layers.0.mlp.weight"] = torch.zeros(4, 5)
    b["model.norm.weight"] = torch.zeros(5)
    del b["model.layers.1.mlp.weight"]
    paths = [_write(tmp_path / "a", a, "safetensors"), _write(tmp_path / "b", b, "safetensors")]
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        modelfuse.merge(_config(paths), out)
    message = str(info.value)
    assert "3 problems" in message
    assert "model.layers.0.mlp.weight has shape [4, 4]" in message
    assert "model.norm.weight has shape [4]" in message
    assert "model.layers.1.mlp.weight is in" in message and "missing from" in message
    _assert_nothing_written(tmp_path, out)


def test_unknown_method_and_parameter(tmp_path):
    paths = [_write(tmp_path / f"m{i}", random_state(i), "safetensors") for i in range(2)]
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown merge method 'avg'; valid methods:"):
        modelfuse.merge(_config(paths, method="avg"), out)
    with pytest.raises(ConfigError, match="unknown parameter 'colour'.*valid parameters: weight"):
        modelfuse.merge(_config(paths, parameters={"colour": 0.5}), out)
    with pytest.raises(ConfigError, match="unknown key.*valid keys: merge_method"):
        modelfuse.merge(_config(paths, merge_methd="linear"), out)
    _assert_nothing_written(tmp_path, out)


def test_output_exists_without_overwrite(tmp_path):
    paths = [_write(tmp_path / f"m{i}", random_state(i), "safetensors") for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        modelfuse.merge(_config(paths), out)
    assert (out / "keep.txt").read_text() == "mine"
    modelfuse.merge(_config(paths), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    import modelfuse.checkpoint.writer as writer_module

    paths = [_write(tmp_path / f"m{i}", random_state(i), "safetensors") for i in range(2)]
    calls = {"n": 0}
    real = writer_module._write_at

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:  # the headers go through; a tensor's bytes do not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module, "_write_at", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk filled up"):
        modelfuse.merge(_config(paths), out, shard_size="200B")
    _assert_nothing_written(tmp_path, out)


def test_nan_input_is_a_warning_naming_the_tensor(tmp_path):
    a, b = random_state(0), random_state(1)
    b["model.norm.weight"][1] = float("nan")
    paths = [_write(tmp_path / "a", a, "safetensors"), _write(tmp_path / "b", b, "safetensors")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = modelfuse.merge(_config(paths), tmp_path / "out")
    assert any("model.norm.weight" in str(w.message) and "NaN" in str(w.message) for w in caught)
    assert any("model.norm.weight" in w for w in result.warnings)


def test_base_listed_among_models_is_not_merged_twice(tmp_path):
    states = [random_state(i) for i in range(2)]
    paths = [_write(tmp_path / f"m{i}", sd, "safetensors") for i, sd in enumerate(states)]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [str(paths[0]), str(paths[1])],
    }
    result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.norm.weight"
    torch.testing.assert_close(merged[name], states[1][name])
    assert any("is both base_model and a model; it is used once, as the base" in note
               for note in result.notes)


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        ({"bogus": 2}, "m0.safetensors: parameters: unknown parameter 'bogus'"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": 0.3}, None),
    ],
)
def test_the_base_s_own_entry_is_checked_and_its_parameters_ignored(tmp_path, parameters, error):
    states = [random_state(i) for i in range(2)]
    paths = [_write(tmp_path / f"m{i}", sd, "safetensors") for i, sd in enumerate(states)]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [{"model": str(paths[0]), "parameters": parameters},
                   {"model": str(paths[1]), "parameters": {"weight": 0.5}}],
    }
    if error is not None:
        with pytest.raises(ConfigError, match=error):
            modelfuse.merge(config, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    with pytest.warns(UserWarning, match=r"'weight' ignored: .*m0.safetensors is the base model"):
        modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.norm.weight"  # base + 0.5 (m1 - base): the base's 0.3 plays no part
    expected = states[0][name] + 0.5 * (states[1][name] - states[0][name])
    torch.testing.assert_close(merged[name], expected)


def test_added_tokens_keep_their_rows(llama_folders, tmp_path):
    """A fine-tune with extra vocabulary rows: shared rows merged, extra rows kept."""
    from transformers import LlamaForCausalLM

    base, small = llama_folders[0], llama_folders[1]
    grown_state = load_file(llama_folders[2] / "model.safetensors")
    extra = torch.randn(3, 32)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown_state[name] = torch.cat([grown_state[name], extra])
    grown = tmp_path / "grown"
    grown.mkdir()
    save_file(grown_state, grown / "model.safetensors")
    config_json = json.loads((llama_folders[2] / "config.json").read_text())
    config_json["vocab_size"] = 67
    (grown / "config.json").write_text(json.dumps(config_json))

    config = {"merge_method": "linear", "models": [str(small), str(grown)]}
    out = tmp_path / "out"
    result = modelfuse.merge(config, out)
    merged = load_file(out / "model.safetensors")
    s = load_file(small / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (67, 32)
        torch.testing.assert_close(merged[name][:64], (s[name] + grown_state[name][:64]) / 2)
        torch.testing.assert_close(merged[name][64:], extra)
    assert any("rows 64-66 are kept from" in note for note in result.notes)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 67
    LlamaForCausalLM.from_pretrained(out)
    del base


def test_other_tensors_may_not_change_rows(tmp_path):
    a, b = random_state(0), random_state(1)
    b["model.layers.0.mlp.weight"] = torch.zeros(6, 4)
    paths = [_write(tmp_path / "a", a, "safetensors"), _write(tmp_path / "b", b, "safetensors")]
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.weight has shape"):
        modelfuse.merge(_config(paths), tmp_path / "out")


BLOCK_PARAMETERS = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "random_seed": 2},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.1},
}


@pytest.mark.parametrize("method", sorted(BLOCK_PARAMETERS))
def test_row_blocks_give_the_same_bytes(tmp_path, monkeypatch, method):
    """Large tensors are merged in blocks of rows (for TIES and breadcrumbs after their
    per-tensor thresholds; DARE's draws are seeded per entry): the same bytes on disk."""
    import modelfuse.merge.schedule as schedule

    states = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = [_write(tmp_path / f"m{i}", sd, "safetensors") for i, sd in enumerate(states)]
    config = {
        "merge_method": method,
        "models": [str(p) for p in paths[1:]],
        "dtype": "bfloat16",
        "parameters": BLOCK_PARAMETERS[method],
    }
    with_base = method != "linear"
    if with_base:
        config["base_model"] = str(paths[0])
    else:
        config["models"] = [str(p) for p in paths]
    modelfuse.merge(config, tmp_path / "whole", threads=1)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 7)  # 10 x 4 embeddings -> blocks of 1 row
    plan = plan_merge(config)
    blocks = {t.name: schedule.row_blocks(plan, t) for t in plan.tasks}
    assert blocks["model.embed_tokens.weight"] == [(i, i + 1) for i in range(10)]
    assert blocks["position_ids"] == [None]
    modelfuse.merge(config, tmp_path / "blocks", threads=2)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == whole
    in_memory = modelfuse.merge_state_dicts(
        method, states[1:] if with_base else states, states[0] if with_base else None,
        dtype="bfloat16", threads=2, **BLOCK_PARAMETERS[method],
    )
    for name, tensor in load_file(tmp_path / "whole" / "model.safetensors").items():
        assert torch.equal(in_memory[name], tensor)


REDUCED = {
    "slerp": {"t": 0.3},
    "multislerp": {},
    "model_stock": {},
    "ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "dare_linear": {"density": 0.5, "random_seed": 4},
    "dare_ties": {"density": 0.5, "random_seed": 4},
}


@pytest.mark.parametrize("method", sorted(REDUCED))
def test_methods_with_whole_tensor_values_merge_row_blocks_alike(monkeypatch, method):
    """Angles, Gram matrices and magnitude thresholds of the whole tensor are computed first
    (the method's reduction), then every block of rows is merged on its own: the same
    result, up to the order of float sums, from one thread or two. Integer task vectors
    make many magnitudes tie at the thresholds, across blocks."""
    import modelfuse.merge.execute as execute
    import modelfuse.merge.methods.random_drops as random_drops
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(30, generator=g)}
    models = [
        {k: v + torch.randint(-2, 3, v.shape, generator=g) for k, v in base.items()}
        for _ in range(2 if method == "slerp" else 3)
    ]
    if method == "slerp":
        models = models[:1]
    params = REDUCED[method]
    monkeypatch.setattr(random_drops, "RANDOM_CHUNK", 7)  # draws cross generator chunks
    whole = modelfuse.merge_state_dicts(method, models, base, **params)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[2]) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        merged = modelfuse.merge_state_dicts(method, models, base, threads=threads, **params)
        for name in whole:
            torch.testing.assert_close(merged[name], whole[name], rtol=1e-6, atol=1e-6)
    assert sum(rows is not None for rows in blocks) == 2 * (12 + 6)  # 30 entries: 6 blocks
    assert reductions  # DARE's default L1 rescale needs the whole tensor's norms


def test_reductions_run_one_at_a_time_and_filter_wise_vectors_are_one_row(monkeypatch):
    """A reduction may read a whole tensor: never two tensors' at once (the blocks of one
    run in parallel). Model Stock's filter_wise gives a 1-D tensor one ratio (it is one
    row), also when the engine splits it."""
    import threading
    import time

    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(2)
    base = {f"t{i}": torch.randn(40, generator=g) for i in range(6)}
    models = [{k: v + torch.randn(40, generator=g) for k, v in base.items()} for _ in range(2)]
    whole = modelfuse.merge_state_dicts("model_stock", models, base, filter_wise=True)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 8)
    running, tensors, lock = [], set(), threading.Lock()
    reduce = execute._reduce

    def counted(*args):
        with lock:
            running.append(args[1].name)
            tensors.add(frozenset(running))
        time.sleep(0.01)
        try:
            return reduce(*args)
        finally:
            with lock:
                running.remove(args[1].name)

    monkeypatch.setattr(execute, "_reduce", counted)
    merged = modelfuse.merge_state_dicts("model_stock", models, base, filter_wise=True, threads=2)
    assert max(len(names) for names in tensors) == 1
    assert sum(1 for names in tensors if names) == 6  # every tensor reduced (5 blocks each)
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-6, atol=1e-6)


def test_torch_threads_are_restored_and_nan_checks_are_exact(tmp_path):
    import modelfuse.merge.execute as execute

    before = torch.get_num_threads()
    states = [random_state(i) for i in range(2)]
    modelfuse.merge_state_dicts("linear", states, threads=2)
    assert torch.get_num_threads() == before
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        finite = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, 0.0], dtype=dtype)
        assert not execute._has_nonfinite(finite)
        for bad in (float("nan"), float("inf"), float("-inf")):
            assert execute._has_nonfinite(torch.cat([finite, torch.tensor([bad], dtype=dtype)]))
