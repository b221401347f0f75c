"""open_checkpoint: which format a path is, Hugging Face folders, shard indexes, bad paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_testing import assert_same, make_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from modelfuse.checkpoint import (
    CheckpointWriter,
    SafetensorsCheckpoint,
    TorchCheckpoint,
    open_checkpoint,
)
from modelfuse.errors import CheckpointError


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """Write shards and an index the way transformers' save_pretrained names them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _error(path: object) -> str:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_sharded_folder_and_index_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder = _save_sharded(tmp_path / "model", tensors)
    for given in (folder, folder / "model.safetensors.index.json", str(folder)):
        with open_checkpoint(given) as ckpt:
            assert isinstance(ckpt, SafetensorsCheckpoint)
            assert ckpt.path == Path(given)
            assert sorted(ckpt.keys()) == sorted(tensors)
            for name in ckpt.keys():
                info = ckpt.info(name)
                with safe_open(str(info.file), "pt") as reference:
                    assert_same(ckpt.read(name), reference.get_tensor(name))
                assert_same(ckpt.read(name), tensors[name])


def test_sharded_keys_in_shard_then_offset_order(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.full((i + 1,), float(i)) for i in range(6)}
    folder = _save_sharded(tmp_path / "m", tensors, shards=2)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.keys() == ["w0", "w2", "w4", "w1", "w3", "w5"]
        assert ckpt.info("w3").file == folder / "model-00002-of-00002.safetensors"


def test_written_checkpoint_reads_back_in_plan_order(tmp_path: Path) -> None:
    tensors = make_tensors(seed=4)
    out = tmp_path / "out"
    same_width = {n: t for n, t in tensors.items() if t.element_size() == 2}
    with CheckpointWriter(
        out, [(n, tuple(t.shape), t.dtype) for n, t in same_width.items()], shard_size=40
    ) as writer:
        for name, tensor in same_width.items():
            writer.write(name, tensor)
        writer.commit()
    with open_checkpoint(out) as ckpt:
        assert ckpt.keys() == list(same_width)


def test_hugging_face_folder_prefers_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    torch.save({"args": 1}, folder / "training_args.bin")
    with open_checkpoint(folder) as ckpt:
        assert isinstance(ckpt, SafetensorsCheckpoint)
        assert ckpt.read("w").tolist() == [1.0, 1.0]
        assert ckpt.folder == folder and ckpt.path == folder


def test_folder_of_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    with open_checkpoint(folder / "model.safetensors") as ckpt:
        assert ckpt.folder is None  # no config.json: not a model folder
    (folder / "config.json").write_text("{}")
    with open_checkpoint(folder / "model.safetensors") as ckpt:
        assert ckpt.folder == folder


def test_folder_with_pytorch_bin(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(tensors, folder / "pytorch_model.bin")
    torch.save({"lr": 0.1}, folder / "training_args.bin")
    with open_checkpoint(folder) as ckpt:
        assert isinstance(ckpt, TorchCheckpoint)
        reference = torch.load(folder / "pytorch_model.bin", weights_only=True)
        assert ckpt.keys() == list(reference)
        for name in reference:
            assert_same(ckpt.read(name), reference[name])


def test_folder_with_a_single_oddly_named_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, str(folder / "weights.safetensors"))
    with open_checkpoint(folder) as ckpt:
        assert ckpt.info("w").file == folder / "weights.safetensors"


def test_sharded_bin_index(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    names = list(tensors)
    weight_map = {}
    for s in range(2):
        file = f"pytorch_model-{s + 1:05d}-of-00002.bin"
        part = {n: tensors[n] for n in names[s::2]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for given in (folder, folder / "pytorch_model.bin.index.json"):
        with open_checkpoint(given) as ckpt:
            assert isinstance(ckpt, TorchCheckpoint)
            assert sorted(ckpt.keys()) == sorted(names)
            for name in names:
                assert_same(ckpt.read(name), tensors[name])
                assert ckpt.info(name).file == folder / weight_map[name]


def test_file_with_an_unusual_suffix_is_recognised_by_content(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "weights.st"))
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.ckpt2")
    with open_checkpoint(tmp_path / "weights.st") as ckpt:
        assert isinstance(ckpt, SafetensorsCheckpoint)
    with open_checkpoint(tmp_path / "weights.ckpt2") as ckpt:
        assert isinstance(ckpt, TorchCheckpoint)


# --- bad paths and folders ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "model.safetensors"
    message = _error(path)
    assert message.startswith(f"{path}: no such file or folder") and "check the path" in message


def test_hub_id_is_not_downloaded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = _error("meta-llama/Llama-2-7b")
    assert message.startswith("meta-llama/Llama-2-7b: no such local file or folder")
    assert "does not download" in message
    assert "hf download meta-llama/Llama-2-7b" in message and "local folder" in message


def test_hub_url_is_not_downloaded() -> None:
    assert "does not download" in _error("hf://org/model")


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"x")
    (folder / "checkpoint-10").mkdir()
    save_file({"w": torch.ones(1)}, str(folder / "checkpoint-10" / "model.safetensors"))
    message = _error(folder)
    assert message.startswith(f"{folder}: holds no weights (found config.json, training_args.bin")
    assert "checkpoint-10" in message and "model.safetensors" in message


def test_empty_folder(tmp_path: Path) -> None:
    assert "holds no weights (found nothing" in _error(tmp_path)


def test_several_safetensors_without_index(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.ones(1)}, str(tmp_path / name))
    message = _error(tmp_path)
    assert "a.safetensors, b.safetensors" in message and "pass one file" in message


def test_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a model")
    message = _error(path)
    assert message.startswith(f"{path}: is not a checkpoint") and ".safetensors" in message


def test_text_named_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("hello, I am not a model at all")
    message = _error(path)
    assert message.startswith(str(path)) and "truncated or not a safetensors file" in message


def test_index_naming_a_missing_shard(tmp_path: Path, tensors) -> None:
    folder = _save_sharded(tmp_path / "model", tensors)
    (folder / "model-00002-of-00003.safetensors").unlink()
    message = _error(folder)
    index = folder / "model.safetensors.index.json"
    assert message.startswith(f"{index}: names shard 'model-00002-of-00003.safetensors'")
    assert f"does not exist in {folder}" in message and "missing shard" in message


def test_index_naming_a_tensor_missing_from_its_shard(tmp_path: Path, tensors) -> None:
    folder = _save_sharded(tmp_path / "model", tensors)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    message = _error(folder)
    assert message.startswith(
        f"{index_path}: names tensor 'ghost.weight' in shard model-00001-of-00003.safetensors"
    )


def test_index_that_is_not_json(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{not json")
    assert "cannot be read as a JSON shard index" in _error(folder)


def test_index_without_weight_map(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}}))
    assert 'has no "weight_map"' in _error(path)


def test_index_pointing_outside_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    assert "outside the index's folder" in _error(path)


def test_the_same_tensor_in_two_shards(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {"w": "a.safetensors", "x": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(tmp_path)
    assert "'w' is also in" in message


def test_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path: Path) -> None:
    folder = _save_sharded(tmp_path / "model", {"w": torch.zeros(2), "v": torch.zeros(1)}, 2)
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    with open_checkpoint(folder) as ckpt:
        assert ckpt.keys() == ["w"] and ckpt.read("w").tolist() == [1.0, 1.0]


def test_deeply_nested_index_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    deep = 100_000
    text = '{"weight_map": ' + "[" * deep + "]" * deep + "}"
    (folder / "model.safetensors.index.json").write_text(text)
    message = _error(folder)
    assert message.startswith(f"{folder / 'model.safetensors.index.json'}: nests JSON")
    assert "too deeply to be a shard index" in message and len(message) < 400


def test_oversized_index_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    from modelfuse.checkpoint import index as index_module

    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}) + " " * 200)
    monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 100)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("the index was read"))
    message = _error(path)
    assert f"{path}: {path.stat().st_size} bytes, more than the 100 a shard index can need" in (
        message
    )


def test_index_naming_a_tensor_with_a_lone_surrogate(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    path = tmp_path / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"w\\udfff": "a.safetensors"}}')
    message = _error(path)
    assert "tensor name 'w\\udfff' is not valid Unicode" in message
    message.encode("ascii")


@pytest.mark.parametrize(
    "shard", ["a\\u0000.safetensors", "\\ud800.safetensors", "x" * 5000 + ".safetensors"]
)
def test_index_naming_impossible_shard_files(tmp_path: Path, shard: str) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"w": "' + shard + '"}}')
    message = _error(path)
    assert message.startswith(f"{path}: ") and len(message) < 500
    message.encode("ascii")
