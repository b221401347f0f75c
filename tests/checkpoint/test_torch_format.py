"""PyTorch .bin/.pt checkpoints: round trips against torch.load, nesting, refusing pickled code."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch
from checkpoint_testing import assert_same

from modelfuse.checkpoint import TorchCheckpoint, open_checkpoint, torch_format
from modelfuse.errors import CheckpointError


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_round_trip_bit_exact(tmp_path: Path, tensors: dict[str, torch.Tensor], suffix) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(tensors, path)
    reference = torch.load(path, weights_only=True)
    with open_checkpoint(path) as ckpt:
        assert isinstance(ckpt, TorchCheckpoint)
        assert ckpt.keys() == list(reference)
        for name, expected in reference.items():
            assert_same(ckpt.read(name), expected)
            info = ckpt.info(name)
            assert (info.shape, info.dtype, info.file) == (
                tuple(expected.shape),
                expected.dtype,
                path,
            )
            assert info.nbytes == expected.numel() * expected.element_size()


def test_legacy_non_zip_format(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 2).to(torch.bfloat16), "b": torch.arange(4)}
    path = tmp_path / "old.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        for name, tensor in tensors.items():
            assert_same(ckpt.read(name), tensor)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 100},
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
        lambda sd: {"model": {"module": sd}, "config": {"lr": 0.1}},
        lambda sd: {"ema": collections.OrderedDict(sd)},
        lambda sd: {"state_dict": sd, "best_score": torch.tensor(0.93)},
    ],
    ids=["state_dict", "model", "model.module", "single-nested", "tensor-beside"],
)
def test_nested_state_dicts_are_unwrapped(tmp_path: Path, wrap) -> None:
    state = {"layer.weight": torch.randn(2, 3), "layer.bias": torch.randn(2)}
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(state), path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        for name, tensor in state.items():
            assert_same(ckpt.read(name), tensor)


def test_non_tensor_entries_beside_tensors_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "version": 2, "note": "x"}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["w"]


def test_read_is_a_fresh_contiguous_copy(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    path = tmp_path / "m.pt"
    torch.save({"a": shared, "b": shared.view(2, 3).t()}, path)  # one storage, two views
    with open_checkpoint(path) as ckpt:
        a = ckpt.read("a")
        b = ckpt.read("b")
        a += 100
        assert b.is_contiguous() and torch.equal(b, torch.arange(6.0).view(2, 3).t())
        assert torch.equal(ckpt.read("a"), torch.arange(6.0))


def test_opening_reads_no_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(1000)}, path)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    state = torch_format.load_state_dict(path)
    # Memory-mapped: the tensor's data lies in a mapping of the file, not in a private copy.
    pointer = state["w"].data_ptr()
    regions = [
        line.split()[0].split("-")
        for line in maps.read_text().splitlines()
        if line.endswith(str(path))
    ]
    assert any(int(lo, 16) <= pointer < int(hi, 16) for lo, hi in regions)


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "trainer.bin"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=0.1)}, path)
    message = _error(path)
    assert "holds objects other than tensors (argparse.Namespace)" in message
    assert "which modelfuse does not unpickle (weights_only=True" in message
    assert "safetensors.torch.save_file" in message


def test_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    message = _error(path)
    assert "holds no tensors" in message and "expected a state dict" in message


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    message = _error(path)
    assert "cannot be loaded as a PyTorch checkpoint" in message and "corrupt" in message


def test_garbage_with_a_torch_suffix(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_text("definitely not pickled tensors")
    assert "is not a PyTorch checkpoint" in _error(path)


def test_several_nested_candidates_are_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"encoder": {"w": torch.ones(1)}, "decoder": {"w": torch.ones(1)}}, path)
    message = _error(path)
    assert "'encoder'" in message and "'decoder'" in message and "on its own" in message


def test_non_string_keys(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({0: torch.ones(1)}, path)
    assert "tensor key 0 is a int" in _error(path)


def test_read_rows(tmp_path: Path) -> None:
    tensor = torch.randn(6, 4).to(torch.float16)
    path = tmp_path / "m.pt"
    torch.save({"w": tensor.t()}, path)  # stored transposed: rows are not contiguous
    with open_checkpoint(path) as ckpt:
        rows = ckpt.read_rows("w", 1, 3)
        assert rows.is_contiguous()
        assert_same(rows, tensor.t()[1:3].contiguous())
        with pytest.raises(ValueError, match="outside"):
            ckpt.read_rows("w", 2, 1)


# Newer pickle protocols: rewritten to protocol 2 and read by the same safe loader.

PROTOCOLS = [
    pytest.param(dict(pickle_protocol=3), id="zip-protocol-3"),
    pytest.param(dict(pickle_protocol=4), id="zip-protocol-4"),
    pytest.param(dict(pickle_protocol=5), id="zip-protocol-5"),
    pytest.param(dict(pickle_protocol=4, _use_new_zipfile_serialization=False), id="legacy-4"),
    pytest.param(dict(pickle_protocol=5, _use_new_zipfile_serialization=False), id="legacy-5"),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load's, in the test
@pytest.mark.parametrize("options", PROTOCOLS)
def test_newer_protocols_are_read_bit_exact(
    tmp_path: Path, tensors: dict[str, torch.Tensor], options
) -> None:
    state = dict(tensors)
    if options.get("_use_new_zipfile_serialization") is False:
        # torch's legacy format itself cannot load float8 and unsigned types beyond uint8
        state = {k: v for k, v in state.items() if k not in {"fp8", "fp8b", "u16", "u32", "u64"}}
    state["view"] = torch.arange(12.0).reshape(3, 4)[:, 1]  # a strided view of a storage
    state["alias"] = state["view"]  # two names for one storage, memoised once
    path = tmp_path / "m.bin"
    torch.save(state, path, **options)
    if options["pickle_protocol"] >= 4:
        with pytest.raises(Exception, match="Unsupported operand"):
            torch.load(path, weights_only=True)  # the safe loader alone cannot read it
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        for name, expected in state.items():
            assert_same(ckpt.read(name), expected.contiguous())


@pytest.mark.parametrize("options", PROTOCOLS[1::2])
@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_newer_protocols_with_nested_state_dicts(tmp_path: Path, options, key: str) -> None:
    state = {"layer.weight": torch.randn(2, 3), "layer.bias": torch.randn(2)}
    path = tmp_path / "lightning.ckpt"
    torch.save({key: state, "epoch": 3, "hyper": {"lr": 0.1, "name": "run"}}, path, **options)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        for name, tensor in state.items():
            assert_same(ckpt.read(name), tensor)


@pytest.mark.parametrize("options", PROTOCOLS[1::2])
def test_newer_protocols_still_refuse_objects(tmp_path: Path, options) -> None:
    path = tmp_path / "trainer.bin"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=0.1)}, path, **options)
    message = _error(path)
    assert "holds objects other than tensors (argparse.Namespace)" in message


def test_newer_protocol_does_not_run_reduce_payloads(tmp_path: Path, capfd) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(1), "x": Boom()}, path, pickle_protocol=4, pickle_module=pickle)
    message = _error(path)
    assert "holds objects other than tensors (print)" in message
    assert "ran code" not in capfd.readouterr().out


def test_downgraded_pickle_matches_the_original_for_plain_data() -> None:
    import pickle

    from modelfuse.checkpoint.pickle_protocol import downgrade_pickle

    value = {"a": [1, 2.5, "x" * 300, ("t", None, True)], "b": {"nested": ["a", "a", "b"]}}
    value["shared"] = value["a"]
    for protocol in (3, 4, 5):
        old, names = downgrade_pickle(pickle.dumps(value, protocol=protocol))
        assert old[:2] == b"\x80\x02" and names == []
        restored = pickle.loads(old)
        assert restored == value and restored["shared"] is restored["a"]
        assert {op.name for op, _, _ in __import__("pickletools").genops(old)}.isdisjoint(
            {"FRAME", "MEMOIZE", "SHORT_BINUNICODE", "STACK_GLOBAL"}
        )


@pytest.mark.parametrize("cut", [3, 40, -20])
def test_truncated_newer_protocol_file(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "m.bin"
    torch.save(
        {"w": torch.ones(100)}, path, pickle_protocol=4, _use_new_zipfile_serialization=False
    )
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    message = _error(path)
    assert "cannot be loaded as a PyTorch checkpoint" in message


def test_tensor_key_with_a_lone_surrogate(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({"w\udc80": torch.ones(1)}, path)
    message = _error(path)
    assert "tensor name 'w\\udc80' is not valid Unicode" in message
    message.encode("ascii")


def test_a_corrupt_pickle_is_not_called_objects(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"cpuq") + 3  # the BINPUT opcode after the string 'cpu'
    path.write_bytes(raw[:at] + b"\xff" + raw[at + 1 :])  # an opcode no pickle has
    message = _error(path)
    assert "cannot be loaded as a PyTorch checkpoint (pickle opcode" in message
    assert "objects other than tensors" not in message


def test_a_storage_larger_than_the_file_is_refused_without_allocating(tmp_path: Path) -> None:
    import struct

    path = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"cpuq\x06K\x02") + 5  # the storage's element count: 2 -> 2**31 - 1
    path.write_bytes(raw[:at] + b"J" + struct.pack("<i", 2**31 - 1) + raw[at + 2 :])
    assert "cannot be loaded as a PyTorch checkpoint" in _error(path)


def test_meta_tensors_are_refused_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({"v": torch.ones(2), "w": torch.empty(2, device="meta")}, path)
    message = _error(path)
    assert "tensor 'w' is on the meta device (a shape without data)" in message


def test_a_crafted_string_length_in_a_newer_protocol_file_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    import struct

    from modelfuse.checkpoint import pickle_protocol

    path = tmp_path / "m.bin"  # protocol 4, then an 8-byte string length of 2**50
    path.write_bytes(b"\x80\x04\x8d" + struct.pack("<Q", 2**50) + b"abc")
    sizes: list[int] = []
    real = pickle_protocol._BoundedReader.read

    def read(self, size: int = -1) -> bytes:
        sizes.append(size)
        return real(self, size)

    monkeypatch.setattr(pickle_protocol._BoundedReader, "read", read)
    message = _error(path)
    assert "cannot be loaded as a PyTorch checkpoint" in message and "MemoryError" not in message
    assert 2**50 in sizes  # asked for, and answered with the 3 bytes there are


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_damaged_newer_protocol_files_are_read_or_refused_in_one_line(
    tmp_path: Path, zip_format: bool
) -> None:
    import random
    import warnings

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "m.bin"
    torch.save(
        {"state_dict": state, "epoch": 1},
        path,
        pickle_protocol=4,
        _use_new_zipfile_serialization=zip_format,
    )
    raw = path.read_bytes()
    rng = random.Random(0)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(150):
        damaged = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with open_checkpoint(path) as ckpt:
                    for name in ckpt.keys():
                        ckpt.read(name)
            outcomes["read"] += 1
        except CheckpointError as exc:  # anything else fails the test
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_an_archive_zipfile_cannot_open_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    raw = bytearray(path.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # the first central directory entry
    raw[entry + 6 : entry + 8] = (200).to_bytes(2, "little")  # needs "zip version 20.0"
    path.write_bytes(bytes(raw))
    assert "cannot be loaded as a PyTorch checkpoint" in _error(path)
