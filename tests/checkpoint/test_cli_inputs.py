"""Crafted checkpoints through the command line: exit 2, one error line, nothing written."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelfuse.cli import main


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _nested_metadata(folder: Path) -> Path:
    deep = 100_000
    return _header_file(
        folder / "bad.safetensors", b'{"__metadata__": ' + b"[" * deep + b"]" * deep + b"}"
    )


def _nested_index(folder: Path) -> Path:
    model = folder / "bad"
    model.mkdir()
    save_file({"w": torch.ones(2)}, str(model / "model-00001-of-00001.safetensors"))
    deep = 100_000
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": ' + '{"a": ' * deep + "1" + "}" * deep + "}"
    )
    return model


def _zero_size_beyond_int64(folder: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}
    return _header_file(folder / "bad.safetensors", json.dumps(header).encode())


def _lone_surrogate(folder: Path) -> Path:
    header = b'{"w\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    return _header_file(folder / "bad.safetensors", header, b"\0" * 8)


CRAFTED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nested header": (_nested_metadata, "nests JSON lists or objects too deeply"),
    "nested index": (_nested_index, "too deeply to be a shard index"),
    "zero-size beyond int64": (_zero_size_beyond_int64, "integers from 0 to 2**63 - 1"),
    "lone surrogate": (_lone_surrogate, "tensor name 'w\\ud800' is not valid Unicode"),
}


def _assert_refused(code: int, err: str, expected: str, folder: Path, before: dict) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert _snapshot(folder) == before
    assert not (folder / "out").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("case", list(CRAFTED))
def test_merge_refuses_a_crafted_checkpoint(tmp_path: Path, capsys, case: str) -> None:
    make, expected = CRAFTED[case]
    bad = make(tmp_path)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels: [{good}, {bad}]\n")
    before = _snapshot(tmp_path)
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet"])
    _assert_refused(code, capsys.readouterr().err, expected, tmp_path, before)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_diff_refuses_a_crafted_checkpoint(tmp_path: Path, capsys, case: str) -> None:
    make, expected = CRAFTED[case]
    bad = make(tmp_path)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    before = _snapshot(tmp_path)
    code = main(["diff", str(good), str(bad), "-o", str(tmp_path / "out"), "--quiet"])
    _assert_refused(code, capsys.readouterr().err, expected, tmp_path, before)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_merge_reads_a_protocol_4_pytorch_file(tmp_path: Path, capsys, legacy: bool) -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0])}
    b = {"w": torch.tensor([3.0, 6.0, 9.0]), "b": torch.tensor([0.0])}
    torch.save(
        {"state_dict": a, "epoch": 2},
        tmp_path / "a.bin",
        pickle_protocol=4,
        _use_new_zipfile_serialization=not legacy,
    )
    save_file(b, str(tmp_path / "b.safetensors"))
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nmodels: [{tmp_path / 'a.bin'}, {tmp_path / 'b.safetensors'}]\n"
    )
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # no warning from torch about the protocol
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["w"].tolist() == [2.0, 4.0, 6.0] and merged["b"].tolist() == [2.0]


def test_merge_refuses_a_pytorch_key_with_a_lone_surrogate(tmp_path: Path, capsys) -> None:
    torch.save({"w\udc80": torch.ones(2)}, tmp_path / "bad.bin", pickle_protocol=4)
    save_file({"w": torch.ones(2)}, str(tmp_path / "good.safetensors"))
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nmodels: [{tmp_path / 'good.safetensors'}, {tmp_path / 'bad.bin'}]\n"
    )
    before = _snapshot(tmp_path)
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet"])
    expected = "tensor name 'w\\udc80' is not valid Unicode"
    _assert_refused(code, capsys.readouterr().err, expected, tmp_path, before)


@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "model_stock"])
def test_merge_of_zero_size_tensors_with_a_huge_dimension(
    tmp_path: Path, capsys, method: str
) -> None:
    shape = [0, 2**63 - 1]
    paths = []
    for number, values in enumerate([(1.0, 2.0), (3.0, 6.0), (5.0, 10.0)]):
        header = {
            "e": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        }
        data = struct.pack("<2f", *values)
        paths.append(
            _header_file(tmp_path / f"m{number}.safetensors", json.dumps(header).encode(), data)
        )
    base, *models = paths
    if method == "slerp":
        models = models[:1]
    config = tmp_path / "merge.yaml"
    listed = ", ".join(str(m) for m in models)
    config.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels: [{listed}]\n"
        + ("parameters: {t: 0.5}\n" if method == "slerp" else "")
    )
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as merged:
        assert merged.get_slice("e").get_shape() == shape
        assert merged.get_tensor("e").numel() == 0
        assert merged.get_tensor("w").shape == (2,)


def test_diff_of_files_in_a_folder_whose_name_is_not_utf8(tmp_path: Path, capsys) -> None:
    import os

    folder = tmp_path / os.fsdecode(b"d\xff")
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(folder / "b.safetensors"))
    before = _snapshot(tmp_path)
    a, b = str(folder / "a.safetensors"), str(folder / "b.safetensors")
    code = main(["diff", a, b, "-o", str(tmp_path / "out"), "--quiet"])
    _assert_refused(code, capsys.readouterr().err, "is not valid Unicode", tmp_path, before)
