"""CheckpointWriter: layout, round trips through safetensors and transformers, atomicity, errors."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from checkpoint_testing import assert_same, leftovers, make_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from modelfuse.checkpoint import CheckpointWriter, open_checkpoint
from modelfuse.checkpoint import writer as writer_module
from modelfuse.errors import CheckpointError, OutputError


def _plan(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _write_all(out: Path, tensors: dict[str, torch.Tensor], **options: object) -> Path:
    with CheckpointWriter(out, _plan(tensors), **options) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.commit()


def _read_with_safetensors(out: Path) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as reference:
            for name in reference.keys():
                assert name not in result
                result[name] = reference.get_tensor(name)
    return result


def test_single_shard_round_trip(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out = tmp_path / "out"
    assert _write_all(out, tensors, metadata={"merge": "linear"}) == out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as reference:
        assert reference.metadata() == {"merge": "linear", "format": "pt"}
    read_back = _read_with_safetensors(out)
    assert read_back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_same(read_back[name], tensor)
    with open_checkpoint(out) as ckpt:
        for name, tensor in tensors.items():
            assert_same(ckpt.read(name), tensor)
    assert leftovers(tmp_path, "out") == []


def test_header_is_aligned_and_padded_with_spaces(tmp_path: Path, tensors) -> None:
    out = _write_all(tmp_path / "out", tensors)
    raw = (out / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    text = raw[8 : 8 + length]
    assert text.startswith(b"{") and text.rstrip(b" ").endswith(b"}")
    header = json.loads(text)
    for name, entry in header.items():
        if name != "__metadata__":
            width = tensors[name].element_size()
            assert (8 + length + entry["data_offsets"][0]) % width == 0, name


def _expected_shards(sizes: list[int], budget: int) -> list[list[int]]:
    """Greedy layout written out independently: a new shard when the next tensor overflows."""
    shards: list[list[int]] = []
    for i, size in enumerate(sizes):
        if not shards or sum(sizes[j] for j in shards[-1]) + size > budget:
            shards.append([])
        shards[-1].append(i)
    return shards


def test_sharded_layout_and_index(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(10,), (30,), (5, 4), (100,), (3,), (3,), (40,), (1,)]
    tensors = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    budget = 160  # bytes; t3 (400 bytes) is larger than the budget
    out = _write_all(tmp_path / "out", tensors, shard_size=budget)
    sizes = [t.numel() * 4 for t in tensors.values()]
    expected = _expected_shards(sizes, budget)
    count = len(expected)
    assert count == 6  # [t0 t1] [t2] [t3 alone, over budget] [t4 t5] [t6] [t7]
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(sizes)}
    keys = list(tensors)
    assert index["weight_map"] == {
        keys[i]: names[s] for s, members in enumerate(expected) for i in members
    }
    for s, members in enumerate(expected):
        with safe_open(str(out / names[s]), "pt") as reference:
            assert sorted(reference.keys()) == sorted(keys[i] for i in members)
            for i in members:
                assert_same(reference.get_tensor(keys[i]), tensors[keys[i]])
    with open_checkpoint(out) as ckpt:
        assert ckpt.keys() == keys
        for name, tensor in tensors.items():
            assert_same(ckpt.read(name), tensor)


def test_size_strings_are_accepted(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(300), "b": torch.zeros(300)}  # 1200 bytes each
    out = _write_all(tmp_path / "out", tensors, shard_size="2KB")
    assert len(list(out.glob("*.safetensors"))) == 2


def test_sharded_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    source = tmp_path / "source"
    model.config.save_pretrained(source)
    (source / "tokenizer_config.json").write_text("{}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "merged"
    with CheckpointWriter(out, _plan(state), shard_size=20_000) as writer:
        copied = writer.copy_model_files(source)
        items = list(state.items())
        random.Random(0).shuffle(items)
        for name, tensor in items:
            writer.write(name, tensor)
        writer.commit()
    assert copied == ["config.json", "tokenizer_config.json"]
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        actual = loaded(tokens).logits
    assert torch.equal(actual, expected)
    for name, tensor in loaded.state_dict().items():
        assert_same(tensor, state[name])


def test_concurrent_writes_in_random_order(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {
        f"layer.{i}.weight": torch.randn(16, 8 + i, generator=g).to(torch.bfloat16)
        for i in range(40)
    }
    names = list(tensors)
    random.Random(3).shuffle(names)
    errors: list[BaseException] = []
    out = tmp_path / "out"
    with CheckpointWriter(out, _plan(tensors), shard_size=2_000) as writer:
        chunks = [names[i::4] for i in range(4)]

        def work(chunk: list[str]) -> None:
            try:
                for name in chunk:
                    writer.write(name, tensors[name])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.bytes_written == sum(t.numel() * 2 for t in tensors.values())
        writer.commit()
    assert errors == []
    read_back = _read_with_safetensors(out)
    assert read_back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_same(read_back[name], tensor)


def test_write_does_not_modify_its_argument_and_accepts_views(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    transposed = base.t()  # a non-contiguous view
    before = base.clone()
    out = tmp_path / "out"
    with CheckpointWriter(out, [("t", (4, 3), torch.float32)]) as writer:
        writer.write("t", transposed)
        writer.commit()
    assert torch.equal(base, before) and not transposed.is_contiguous()
    with open_checkpoint(out) as ckpt:
        assert torch.equal(ckpt.read("t"), before.t())


def test_bytes_written_counts_tensor_bytes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (3,), torch.float16), ("b", (5,), torch.float64)]) as w:
        assert w.bytes_written == 0
        w.write("b", torch.zeros(5, dtype=torch.float64))
        assert w.bytes_written == 40
        w.write("a", torch.zeros(3, dtype=torch.float16))
        assert w.bytes_written == 46
        w.commit()


def test_write_checks_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (2, 3), torch.float32)]) as writer:
        with pytest.raises(ValueError, match=r"planned as torch.float32 \[2, 3\]"):
            writer.write("a", torch.zeros(3, 2))
        with pytest.raises(ValueError, match="torch.float16"):
            writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
        with pytest.raises(ValueError, match="'b' is not among the planned"):
            writer.write("b", torch.zeros(1))
        writer.write("a", torch.zeros(2, 3))
        with pytest.raises(ValueError, match="already written"):
            writer.write("a", torch.zeros(2, 3))
        writer.commit()


def test_files_appear_only_at_commit_in_a_temporary_folder_beside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (2,), torch.float32)]) as writer:
        writer.write("a", torch.ones(2))
        assert not out.exists()
        temporary = leftovers(tmp_path, "out")
        assert len(temporary) == 1 and temporary[0].startswith(".out.tmp-")
        assert (tmp_path / temporary[0] / "model.safetensors").is_file()
        writer.commit()
    assert out.is_dir() and leftovers(tmp_path, "out") == []


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    out = _write_all(tmp_path / "a" / "b" / "out", {"w": torch.ones(1)})
    assert (out / "model.safetensors").is_file()


def test_commit_with_missing_tensors_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = [("a", (1,), torch.float32), ("b", (1,), torch.float32)]
    with CheckpointWriter(out, plan) as writer:
        writer.write("a", torch.ones(1))
        with pytest.raises(OutputError) as caught:
            writer.commit()
    message = str(caught.value)
    assert "1 of 2 planned tensors were never written in full ('b')" in message
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_exception_inside_the_block_aborts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, [("a", (1,), torch.float32)]) as writer:
            writer.write("a", torch.ones(1))
            raise RuntimeError("boom")
    assert not out.exists() and leftovers(tmp_path, "out") == []
    with pytest.raises(OutputError, match="after the writer was aborted"):
        writer.write("a", torch.ones(1))
    writer.abort()  # idempotent


def test_leaving_the_block_without_commit_aborts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (1,), torch.float32)]) as writer:
        writer.write("a", torch.ones(1))
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_existing_output_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as caught:
        CheckpointWriter(out, [("a", (1,), torch.float32)])
    message = str(caught.value)
    assert message.startswith(str(out)) and "--overwrite" in message and "another path" in message
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path, "out") == []


def test_overwrite_replaces_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with CheckpointWriter(out, [("a", (2,), torch.float32)], overwrite=True) as writer:
        writer.write("a", torch.full((2,), 5.0))
        assert (out / "old.txt").read_text() == "old"  # untouched until commit
        writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with open_checkpoint(out) as ckpt:
        assert ckpt.read("a").tolist() == [5.0, 5.0]
    assert leftovers(tmp_path, "out") == []


def test_overwrite_then_failure_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError):
        with CheckpointWriter(out, [("a", (2,), torch.float32)], overwrite=True) as writer:
            writer.commit()  # "a" never written
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path, "out") == []


def test_overwrite_replaces_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    _write_all(out, {"w": torch.ones(1)}, overwrite=True)
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path, "out") == []


def _disk_full(fd: int, data: memoryview, offset: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_tensor_write(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    writer = CheckpointWriter(out, [("a", (4,), torch.float32), ("b", (4,), torch.float32)])
    writer.write("a", torch.ones(4))
    monkeypatch.setattr(writer_module, "_write_at", _disk_full)
    with pytest.raises(OutputError) as caught:
        writer.write("b", torch.ones(4))
    message = str(caught.value)
    assert message.startswith(f"{out}: the disk filled up while writing tensor 'b'")
    assert message.endswith("; nothing was written to it; free space and run again")
    assert "\n" not in message
    assert not out.exists() and leftovers(tmp_path, "out") == []
    with pytest.raises(OutputError) as again:  # later calls repeat the reason, not "aborted"
        writer.commit()
    assert str(again.value) == message


def test_disk_full_keeps_an_existing_output_untouched(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    with CheckpointWriter(out, [("a", (4,), torch.float32)], overwrite=True) as writer:
        monkeypatch.setattr(writer_module, "_write_at", _disk_full)
        with pytest.raises(OutputError, match="disk filled up"):
            writer.write("a", torch.ones(4))
    assert (out / "model.safetensors").read_bytes() == b"previous"
    assert leftovers(tmp_path, "out") == []


def test_disk_full_while_writing_headers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module, "_write_at", _disk_full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk filled up while writing the shard headers"):
        CheckpointWriter(out, [("a", (4,), torch.float32)])
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_disk_full_during_concurrent_writes(tmp_path: Path, monkeypatch) -> None:
    tensors = {f"t{i}": torch.randn(64) for i in range(30)}
    out = tmp_path / "out"
    real = writer_module._write_at
    calls = {"n": 0}
    lock = threading.Lock()

    def fills_up(fd: int, data: memoryview, offset: int) -> None:
        with lock:
            calls["n"] += 1
            full = calls["n"] > 10
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    errors: list[BaseException] = []
    with CheckpointWriter(out, _plan(tensors), shard_size=1000) as writer:
        monkeypatch.setattr(writer_module, "_write_at", fills_up)

        def work(names: list[str]) -> None:
            for name in names:
                try:
                    writer.write(name, tensors[name])
                except OutputError as exc:
                    errors.append(exc)
                    return

        names = list(tensors)
        threads = [threading.Thread(target=work, args=(names[i::3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert any("disk filled up" in str(e) for e in errors)
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_unsupported_dtype_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="complex128, which safetensors cannot store"):
        CheckpointWriter(out, [("z", (2,), torch.complex128)])
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_repeated_names_in_the_plan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeated"):
        CheckpointWriter(tmp_path / "out", [("a", (1,), torch.float32)] * 2)
    assert leftovers(tmp_path, "out") == []


def test_add_file_and_copy_model_files(tmp_path: Path) -> None:
    source = tmp_path / "base"
    source.mkdir()
    wanted = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "added_tokens.json",
    ]
    unwanted = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "README.md",
        "training_args.bin",
        "vocab.safetensors",
    ]
    for name in wanted + unwanted:
        (source / name).write_text(f"content of {name}")
    (source / "sub").mkdir()
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (1,), torch.float32)]) as writer:
        writer.add_file("config.json", '{"torch_dtype": "bfloat16"}')
        writer.add_file("modelfuse.yaml", "merge_method: linear\n")
        writer.add_file("extra/blob.dat", b"\x00\x01")
        copied = writer.copy_model_files(source)
        writer.write("a", torch.ones(1))
        writer.commit()
    assert sorted(copied) == sorted(set(wanted) - {"config.json"})
    for name in copied:
        assert (out / name).read_text() == f"content of {name}"
    assert (out / "config.json").read_text() == '{"torch_dtype": "bfloat16"}'
    assert (out / "modelfuse.yaml").read_text() == "merge_method: linear\n"
    assert (out / "extra" / "blob.dat").read_bytes() == b"\x00\x01"
    assert not (out / "README.md").exists() and not (out / "pytorch_model.bin").exists()


def test_add_file_refuses_weight_names_and_escapes(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out", [("a", (1,), torch.float32)]) as writer:
        bad_names = [
            "model.safetensors",
            "model.safetensors.index.json",
            "old.bin",
            "../evil",
            "/abs",
            "",
        ]
        for bad in bad_names:
            with pytest.raises(ValueError):
                writer.add_file(bad, "x")


def test_copy_model_files_from_a_missing_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (1,), torch.float32)]) as writer:
        with pytest.raises(CheckpointError, match="no such folder"):
            writer.copy_model_files(tmp_path / "nope")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_empty_and_scalar_tensors(tmp_path: Path) -> None:
    tensors = {
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
    }
    out = _write_all(tmp_path / "out", tensors)
    read_back = _read_with_safetensors(out)
    for name, tensor in tensors.items():
        assert_same(read_back[name], tensor)


def test_every_dtype_survives_sharding(tmp_path: Path) -> None:
    tensors = make_tensors(seed=5)
    out = _write_all(tmp_path / "out", tensors, shard_size=64)
    assert len(list(out.glob("*.safetensors"))) > 3
    read_back = _read_with_safetensors(out)
    for name, tensor in tensors.items():
        assert_same(read_back[name], tensor)
    assert math.isclose(
        json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"],
        sum(t.numel() * t.element_size() for t in tensors.values()),
    )


def test_an_interrupted_process_leaves_no_temporary_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import sys, torch\n"
        "from modelfuse.checkpoint import CheckpointWriter\n"
        "plan = [('a', (2,), torch.float32), ('b', (2,), torch.float32)]\n"
        "w = CheckpointWriter(sys.argv[1], plan)\n"
        "w.write('a', torch.ones(2))\n"
        "raise KeyboardInterrupt\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_output_permissions_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        out = _write_all(tmp_path / "out", {"a": torch.ones(2)}, shard_size=4)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_a_read_error_mid_merge_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    tensors = {"a": torch.randn(50), "b": torch.randn(50)}
    save_file(tensors, str(source))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as caught:
        with open_checkpoint(source) as ckpt, CheckpointWriter(out, _plan(tensors)) as writer:
            first, second = ckpt.keys()
            writer.write(first, ckpt.read(first))
            with open(source, "r+b") as handle:  # the file shrinks under the running merge
                handle.truncate(source.stat().st_size - 100)
            writer.write(second, ckpt.read(second))
            writer.commit()
    message = str(caught.value)
    assert message.startswith(f"{source}: tensor '{second}': read 100 of its 200 bytes")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_row_blocks_in_any_order_from_threads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    tensors = {
        "embed": torch.randn(37, 6, generator=g).to(torch.bfloat16),
        "head": torch.randn(20, 3, 2, generator=g),
        "bias": torch.randn(5, generator=g).to(torch.float16),
    }
    blocks = []
    for name, tensor in tensors.items():
        edges = [0, *sorted(random.Random(len(name)).sample(range(1, len(tensor)), 3)), len(tensor)]
        blocks += [(name, a, tensor[a:b]) for a, b in zip(edges, edges[1:])]
    random.Random(1).shuffle(blocks)
    out = tmp_path / "out"
    with CheckpointWriter(out, _plan(tensors), shard_size=300) as writer:
        threads = [
            threading.Thread(
                target=lambda part: [writer.write_rows(n, a, t) for n, a, t in part],
                args=(blocks[i::3],),
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.bytes_written == sum(t.numel() * t.element_size() for t in tensors.values())
        writer.commit()
    read_back = _read_with_safetensors(out)
    for name, tensor in tensors.items():
        assert_same(read_back[name], tensor)


def test_row_blocks_must_not_overlap_or_leave_gaps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, [("w", (6, 2), torch.float32), ("s", (), torch.float32)]) as writer:
        writer.write_rows("w", 0, torch.zeros(3, 2))
        with pytest.raises(ValueError, match="rows 2:4 of tensor 'w' was already written"):
            writer.write_rows("w", 2, torch.zeros(2, 2))
        with pytest.raises(ValueError, match="already written"):
            writer.write("w", torch.zeros(6, 2))
        with pytest.raises(ValueError, match="expected a non-empty block of whole rows"):
            writer.write_rows("w", 5, torch.zeros(2, 2))  # runs past row 6
        with pytest.raises(ValueError, match="expected a non-empty block"):
            writer.write_rows("w", 3, torch.zeros(3, 3))  # wrong row width
        with pytest.raises(ValueError, match="expected a non-empty block"):
            writer.write_rows("s", 0, torch.zeros(1))  # a scalar has no rows
        writer.write("s", torch.tensor(1.0))
        writer.write_rows("w", 4, torch.zeros(2, 2))  # rows 3:4 stay unwritten
        with pytest.raises(
            OutputError, match=r"1 of 2 planned tensors were never written in full \('w'\)"
        ):
            writer.commit()
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_tensor_name_with_a_lone_surrogate_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError) as caught:
        CheckpointWriter(out, [("ok", (1,), torch.float32), ("w\ud800", (1,), torch.float32)])
    message = str(caught.value)
    assert message.startswith(f"{out}: tensor name 'w\\ud800' is not valid Unicode")
    assert "rename the tensor" in message
    message.encode("ascii")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_metadata_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="metadata 'note': 'x\\\\udfff' is not valid Unicode"):
        CheckpointWriter(out, [("w", (1,), torch.float32)], metadata={"note": "x\udfff"})
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_a_surrogate_pair_name_is_written_as_utf8(tmp_path: Path) -> None:
    out = _write_all(tmp_path / "out", {"w\U0001f600": torch.ones(2)})
    assert list(_read_with_safetensors(out)) == ["w\U0001f600"]


def test_extra_text_that_is_not_unicode_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError) as caught:
        with CheckpointWriter(out, [("w", (1,), torch.float32)]) as writer:
            writer.write("w", torch.ones(1))
            writer.add_file("modelfuse.yaml", "models:\n- /data/d\udcff/a.safetensors\n")
            writer.commit()
    message = str(caught.value)
    assert message.startswith(f"{out}: modelfuse.yaml would hold text that is not valid Unicode")
    assert "d\\udcff/a" in message and "\n" not in message
    message.encode("ascii")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_file_name_writes_one_file_whatever_the_shard_size(tmp_path: Path) -> None:
    plan = [("a", (300,), torch.float32), ("b", (200,), torch.float32)]
    with CheckpointWriter(
        tmp_path / "adapter", plan, shard_size=100, file_name="adapter_model.safetensors"
    ) as writer:
        writer.write("a", torch.arange(300.0))
        writer.write("b", torch.ones(200))
        writer.commit()
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.arange(300.0)) and f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", ["model.bin", "sub/adapter.safetensors", ".hidden.safetensors"])
def test_file_name_must_be_a_plain_safetensors_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain .safetensors file name"):
        CheckpointWriter(tmp_path / "out", [("a", (1,), torch.float32)], file_name=name)
    assert list(tmp_path.iterdir()) == []
