"""``modelfuse.cli._output``: the one way calibrate, ensemble and compare write their outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from modelfuse.cli._output import (
    check_folder_output,
    check_output,
    current_umask,
    publish_folder,
    refuse_existing,
    require_parent_folder,
    staging_folder,
    write_atomically,
    write_json,
)
from modelfuse.errors import ConfigError, OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_current_umask_is_the_process_umask_and_leaves_it_unchanged() -> None:
    before = _umask()
    assert current_umask() == before
    assert _umask() == before


def test_refuse_existing(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    refuse_existing(out, overwrite=False)  # absent: fine
    out.write_text("{}")
    refuse_existing(out, overwrite=True)
    with pytest.raises(OutputError) as info:
        refuse_existing(out, overwrite=False)
    assert str(info.value) == (
        f"{out}: already exists; remove it, choose another -o, or pass --overwrite"
    )


def test_require_parent_folder(tmp_path: Path) -> None:
    require_parent_folder(tmp_path / "out.json")
    out = tmp_path / "missing" / "out.json"
    with pytest.raises(OutputError) as info:
        require_parent_folder(out)
    assert str(info.value) == f"{out}: the folder {out.parent} does not exist; create it first"


def test_check_output_file(tmp_path: Path) -> None:
    check_output(tmp_path / "A.JSON", suffix=".json", overwrite=False)  # suffix case-insensitive
    with pytest.raises(ConfigError, match=r"out\.npy: the output must be a \.json file; "
                                          r"name it OUT\.json"):  # fmt: skip
        check_output(tmp_path / "out.npy", suffix=".json", overwrite=True)
    folder = tmp_path / "dir.json"
    folder.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        check_output(folder, suffix=".json", overwrite=False)
    with pytest.raises(OutputError, match="is a folder; choose a file name for -o"):
        check_output(folder, suffix=".json", overwrite=True)
    with pytest.raises(OutputError, match="does not exist; create it first"):
        check_output(tmp_path / "no" / "o.json", suffix=".json", overwrite=False)


def test_check_folder_output(tmp_path: Path) -> None:
    out = tmp_path / "report"
    check_folder_output(out, overwrite=False)
    out.mkdir()
    check_folder_output(out, overwrite=True)
    with pytest.raises(OutputError, match="already exists"):
        check_folder_output(out, overwrite=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError) as info:
        check_folder_output(a_file, overwrite=True)
    assert str(info.value) == f"{a_file}: exists and is not a folder; choose another -o"


def test_write_atomically_and_write_json(tmp_path: Path) -> None:
    out = tmp_path / "a.npy"
    values = np.arange(6.0).reshape(2, 3)
    write_atomically(out, lambda stream: np.save(stream, values))
    np.testing.assert_array_equal(np.load(out), values)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600
    saved = tmp_path / "s.json"
    write_json(saved, {"x": 1.5, "nan": float("nan")})
    assert saved.read_text().endswith("\n")
    loaded = json.loads(saved.read_text())
    assert loaded["x"] == 1.5 and np.isnan(loaded["nan"])
    assert _hidden(tmp_path) == []


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")

    def fail(stream) -> None:
        stream.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError) as info:
        write_atomically(out, fail)
    assert str(info.value) == f"{out}: cannot write (No space left on device); nothing was written"
    assert out.read_bytes() == b"old"
    assert _hidden(tmp_path) == []


def test_publish_folder_creates_and_replaces(tmp_path: Path) -> None:
    out = tmp_path / "report"
    staging = staging_folder(out)
    assert staging.parent == tmp_path and staging.name.startswith(".report.")
    assert staging.stat().st_mode & 0o777 == 0o700  # private while it is being written
    (staging / "new.md").write_text("first")
    publish_folder(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.md"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()

    staging = staging_folder(out)
    (staging / "other.md").write_text("second")
    publish_folder(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["other.md"]  # the old folder is gone
    assert (out / "other.md").read_text() == "second"
    assert _hidden(tmp_path) == []


def test_an_output_never_is_or_holds_an_input(tmp_path) -> None:
    from modelfuse.cli._output import refuse_output_over_inputs

    (tmp_path / "run").mkdir()
    inputs = {"--predictions a": tmp_path / "run" / "a.npz:logits", "--labels": None}
    refuse_output_over_inputs(tmp_path / "elsewhere", inputs)  # unrelated: allowed
    with pytest.raises(OutputError, match=r"run/a\.npz: is the input of --predictions a"):
        refuse_output_over_inputs(tmp_path / "run" / "a.npz", inputs)
    with pytest.raises(OutputError, match=r"run: holds the input of --predictions a; choose"):
        refuse_output_over_inputs(tmp_path / "run", inputs)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with pytest.raises(OutputError, match="link: holds the input of --predictions a"):
        refuse_output_over_inputs(tmp_path / "link", inputs)
