"""Reading safetensors files: round trips against the safetensors library, laziness, validation."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from checkpoint_testing import assert_same, make_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from modelfuse.checkpoint import SafetensorsCheckpoint, open_checkpoint
from modelfuse.checkpoint import safetensors_format as fmt
from modelfuse.errors import CheckpointError


def test_round_trip_every_dtype_bit_exact(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"note": "hi"})
    with open_checkpoint(path) as ckpt, safe_open(str(path), "pt") as reference:
        assert isinstance(ckpt, SafetensorsCheckpoint)
        assert sorted(ckpt.keys()) == sorted(reference.keys())
        assert ckpt.metadata == {"note": "hi"}
        for name in reference.keys():
            expected = reference.get_tensor(name)
            assert_same(ckpt.read(name), expected)
            assert_same(ckpt.read(name), tensors[name])
            info = ckpt.info(name)
            assert info.shape == tuple(expected.shape)
            assert info.dtype == expected.dtype
            assert info.nbytes == expected.numel() * expected.element_size()
            assert info.file == path
        assert len(ckpt) == len(tensors)
        assert "counts" in ckpt and "nope" not in ckpt


def test_keys_follow_data_offsets(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda n: tuple(header[n]["data_offsets"]))
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == by_offset


def test_read_returns_a_fresh_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    with open_checkpoint(path) as ckpt:
        first = ckpt.read("w")
        first += 100
        second = ckpt.read("w")
    assert second.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert first.data_ptr() != second.data_ptr()


def test_missing_tensor_names_checkpoint_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"model.w": torch.ones(1)}, str(path))
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError) as caught:
        ckpt.info("w2")
    message = str(caught.value)
    assert str(path) in message and "'w2'" in message and "\n" not in message
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match="'other'"):
        ckpt.read("other")


def test_reading_one_tensor_reads_only_its_bytes(tmp_path: Path, monkeypatch) -> None:
    tensors = {"a": torch.randn(100), "b": torch.randn(50), "c": torch.randn(100)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with open_checkpoint(path) as ckpt:
        start = ckpt._where["b"][1]  # absolute offset of b's data
        calls: list[tuple[int, int]] = []
        real = os.preadv

        def counting(fd, buffers, offset):
            calls.append((offset, sum(len(b) for b in buffers)))
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", counting)
        assert_same(ckpt.read("b"), tensors["b"])
    assert calls and all(start <= off and off + n <= start + 200 for off, n in calls)
    assert sum(n for _, n in calls) == 200


def test_other_tensors_bytes_are_never_looked_at(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(64), "b": torch.randn(32), "c": torch.randn(64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), "pt") as reference:
        keys = list(reference.keys())
    assert set(keys) == {"a", "b", "c"}
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    for name in ("a", "c"):  # overwrite a's and c's data with garbage NaN patterns
        begin, end = header[name]["data_offsets"]
        raw[8 + length + begin : 8 + length + end] = b"\xff" * (end - begin)
    path.write_bytes(bytes(raw))
    with open_checkpoint(path) as ckpt:
        assert_same(ckpt.read("b"), tensors["b"])
        assert torch.isnan(ckpt.read("a")).all()


def test_concurrent_reads(tmp_path: Path) -> None:
    tensors = make_tensors(seed=3)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    errors: list[BaseException] = []
    with open_checkpoint(path) as ckpt:

        def work(seed: int) -> None:
            names = list(tensors)
            order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))
            try:
                for _ in range(5):
                    for i in order.tolist():
                        assert_same(ckpt.read(names[i]), tensors[names[i]])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_read_after_close_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    ckpt = open_checkpoint(path)
    ckpt.close()
    ckpt.close()
    with pytest.raises(CheckpointError, match="after close"):
        ckpt.read("w")


# --- corrupt files: each case raises one line naming the file and the problem ---------------


def _craft(path: Path, header: object, data: bytes, *, length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + text + data)
    return path


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_file_shorter_than_the_length_field(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    assert "too short" in _error(path)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = _craft(
        tmp_path / "m.safetensors", {"w": _entry("F32", [1], 0, 4)}, b"\0" * 4, length=10_000
    )
    message = _error(path)
    assert "10000" in message and "truncated" in message


def test_truncated_file_offsets_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(10), "b": torch.ones(10)}, str(path))
    path.write_bytes(path.read_bytes()[:-12])
    message = _error(path)
    assert "past the end" in message and "truncated" in message


def test_invalid_json(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", b'{"w": {"dtype": "F32",', b"")
    assert "not valid JSON" in _error(path)


def test_header_not_an_object(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", [1, 2], b"")
    assert "JSON list" in _error(path)


def test_unknown_dtype(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("F12", [1], 0, 4)}, b"\0" * 4)
    message = _error(path)
    assert "'w'" in message and "'F12'" in message and "BF16" in message


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}
    path = _craft(tmp_path / "m.safetensors", header, b"\0" * 12)
    message = _error(path)
    assert "'b' overlaps tensor 'a'" in message


def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}
    path = _craft(tmp_path / "m.safetensors", header, b"\0" * 12)
    assert "gap of 4 bytes after tensor 'a'" in _error(path)


def test_span_disagrees_with_shape(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("BF16", [3], 0, 8)}, b"\0" * 8)
    message = _error(path)
    assert "'w'" in message and "span 8 bytes" in message and "needs 6" in message


def test_trailing_bytes(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("F32", [1], 0, 4)}, b"\0" * 9)
    assert "5 bytes at the end" in _error(path)


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'
    path = _craft(tmp_path / "m.safetensors", text, b"\0" * 4)
    assert "appears twice" in _error(path)


def test_bad_shape(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("F32", [-1], 0, 4)}, b"\0" * 4)
    assert "is not a list of at most 64 integers from 0 to 2**63 - 1" in _error(path)


def test_entry_without_offsets(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
    assert "lacks 'dtype', 'shape' or 'data_offsets'" in _error(path)


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    header = {"__metadata__": {"n": 3}, "w": _entry("F32", [1], 0, 4)}
    path = _craft(tmp_path / "m.safetensors", header, b"\0" * 4)
    assert "__metadata__" in _error(path)


def test_encode_header_is_read_by_safetensors(tmp_path: Path) -> None:
    blob = fmt.encode_header(
        [("x", torch.float16, (2, 2), 0, 8), ("y", torch.uint8, (3,), 8, 11)], {"format": "pt"}
    )
    assert len(blob) % 8 == 0
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    y = torch.tensor([7, 8, 9], dtype=torch.uint8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob + x.numpy().tobytes() + y.numpy().tobytes())
    with safe_open(str(path), "pt") as reference:
        assert reference.metadata() == {"format": "pt"}
        assert torch.equal(reference.get_tensor("x"), x)
        assert torch.equal(reference.get_tensor("y"), y)


def test_read_rows_reads_only_those_rows(tmp_path: Path, monkeypatch) -> None:
    tensors = {"a": torch.randn(7, 3).to(torch.bfloat16), "b": torch.randn(4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with open_checkpoint(path) as ckpt:
        start = ckpt._where["a"][1]
        calls: list[tuple[int, int]] = []
        real = os.preadv

        def counting(fd, buffers, offset):
            calls.append((offset, sum(len(b) for b in buffers)))
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", counting)
        assert_same(ckpt.read_rows("a", 2, 5), tensors["a"][2:5])
        assert calls == [(start + 2 * 6, 3 * 6)]
        assert_same(ckpt.read_rows("a", 7, 7), tensors["a"][7:7])
        with pytest.raises(ValueError, match="rows 3:9 are outside its 7 rows"):
            ckpt.read_rows("a", 3, 9)


# Crafted headers: every one is refused in one line, with bounded work and message.

DEEP = 100_000


def _assert_bounded(message: str) -> None:
    assert "\n" not in message and len(message) < 600
    message.encode("ascii")  # printable anywhere, no lone surrogate


def test_deeply_nested_metadata_is_one_line(tmp_path: Path) -> None:
    text = b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    path = _craft(tmp_path / "m.safetensors", text, b"")
    message = _error(path)
    assert "nests JSON lists or objects too deeply" in message
    _assert_bounded(message)


def test_deeply_nested_tensor_entry_is_one_line(tmp_path: Path) -> None:
    text = b'{"w": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}"
    path = _craft(tmp_path / "m.safetensors", text, b"")
    assert "too deeply" in _error(path)


def test_moderately_nested_entry_is_shown_bounded(tmp_path: Path) -> None:
    # shallow enough for the JSON parser: the message shows a bounded preview of it
    text = b'{"w": ' + b"[" * 500 + b"]" * 500 + b"}"
    path = _craft(tmp_path / "m.safetensors", text, b"")
    message = _error(path)
    assert "header entry [[[[...]]]] lacks 'dtype'" in message
    _assert_bounded(message)


def test_header_length_field_of_a_petabyte_is_refused_before_reading(tmp_path: Path) -> None:
    data = struct.pack("<Q", 10**15) + b'{"w": 1}'
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return data[offset : offset + size]

    with pytest.raises(CheckpointError, match="says 1000000000000000 bytes but only 8"):
        fmt.read_header(tmp_path / "m.safetensors", len(data), read_at)
    assert reads == [(0, 8)]


@pytest.mark.parametrize("shape", [[0, 10**18], [10**18, 0, 3], [0, 2**63 - 1]])
def test_zero_size_tensor_with_a_huge_other_dimension_reads_empty(
    tmp_path: Path, shape: list[int]
) -> None:
    header = {"e": _entry("F32", shape, 0, 0), "w": _entry("F32", [2], 0, 8)}
    path = _craft(tmp_path / "m.safetensors", header, struct.pack("<2f", 1.5, 2.5))
    with open_checkpoint(path) as ckpt:
        assert ckpt.info("e").shape == tuple(shape) and ckpt.info("e").nbytes == 0
        empty = ckpt.read("e")
        assert tuple(empty.shape) == tuple(shape) and empty.numel() == 0
        assert ckpt.read("w").tolist() == [1.5, 2.5]


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**70], [0, 10**30]])
def test_dimension_beyond_int64_is_refused(tmp_path: Path, shape: list[int]) -> None:
    path = _craft(tmp_path / "m.safetensors", {"e": _entry("F32", shape, 0, 0)}, b"")
    message = _error(path)
    assert "tensor 'e': shape [0, " in message and "integers from 0 to 2**63 - 1" in message
    _assert_bounded(message)


def test_huge_shape_with_a_small_span_is_refused_without_big_numbers(tmp_path: Path) -> None:
    # 64 dimensions of 2**62: the product is never formed; the span check stops at once
    shape = [2**62] * 64
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("F32", shape, 0, 4)}, b"\0" * 4)
    message = _error(path)
    assert "span 4 bytes" in message and "needs more bytes than the file holds" in message
    _assert_bounded(message)


def test_too_many_dimensions_are_refused(tmp_path: Path) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry("F32", [1] * 65, 0, 4)}, b"\0" * 4)
    assert "not a list of at most 64 integers" in _error(path)


def test_integer_of_thousands_of_digits_is_one_line(tmp_path: Path) -> None:
    text = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    path = _craft(tmp_path / "m.safetensors", text, b"\0" * 4)
    message = _error(path)
    assert "not valid JSON (an integer of more than 4300 digits)" in message
    _assert_bounded(message)


def test_tensor_name_with_a_lone_surrogate_is_refused_escaped(tmp_path: Path) -> None:
    text = b'{"w\\ud800x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = _craft(tmp_path / "m.safetensors", text, b"\0" * 4)
    message = _error(path)
    assert "tensor name 'w\\ud800x' is not valid Unicode (it holds a lone surrogate)" in message
    assert "rename the tensor" in message
    _assert_bounded(message)


def test_tensor_name_with_a_surrogate_pair_is_read(tmp_path: Path) -> None:
    # a proper pair is one character (U+1F600), valid UTF-8: read as the safetensors library does
    text = b'{"w\\ud83d\\ude00": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = _craft(tmp_path / "m.safetensors", text, struct.pack("<f", 2.0))
    with open_checkpoint(path) as ckpt, safe_open(str(path), "pt") as reference:
        assert ckpt.keys() == list(reference.keys()) == ["w\U0001f600"]
        assert ckpt.read("w\U0001f600").tolist() == [2.0]


def test_long_tensor_names_are_shortened_in_messages(tmp_path: Path) -> None:
    name = "x" * 100_000
    path = _craft(tmp_path / "m.safetensors", {name: _entry("F99", [1], 0, 4)}, b"\0" * 4)
    message = _error(path)
    assert "tensor 'xxxx" in message and "...'" in message
    _assert_bounded(message)


@pytest.mark.parametrize("code", [[1], {"a": 1}, 4, None])
def test_dtype_that_is_not_a_string(tmp_path: Path, code: object) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": _entry(code, [1], 0, 4)}, b"\0" * 4)  # type: ignore[arg-type]
    assert "tensor 'w': unknown dtype" in _error(path)


@pytest.mark.parametrize("metadata", [0, False, [], ""])
def test_metadata_that_is_not_a_mapping(tmp_path: Path, metadata: object) -> None:
    header = {"__metadata__": metadata, "w": _entry("F32", [1], 0, 4)}
    path = _craft(tmp_path / "m.safetensors", header, b"\0" * 4)
    assert "__metadata__" in _error(path) and "is not a mapping of strings" in _error(path)


def test_null_metadata_is_no_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": None, "w": _entry("F32", [1], 0, 4)}
    path = _craft(tmp_path / "m.safetensors", header, b"\0" * 4)
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {} and ckpt.keys() == ["w"]
