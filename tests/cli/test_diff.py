"""``modelfuse diff`` through the command line: ranges, -o, --quiet, and never over an input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main
from modelfuse.merge.patch import PatchSource


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    g = torch.Generator().manual_seed(0)
    (tmp_path / "a").mkdir()
    save_file({"w": torch.randn(4, 3, generator=g)}, tmp_path / "a" / "model.safetensors")
    save_file({"w": torch.randn(4, 3, generator=g)}, tmp_path / "b.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(args: list[str], capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    before, names = _snapshot(folder), sorted(os.listdir(folder))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("modelfuse: error:"), err
    assert sum(line.startswith("modelfuse: error:") for line in lines) <= 1
    assert sorted(os.listdir(folder)) == names and _snapshot(folder) == before
    return err


def test_diff_quiet_writes_b_minus_a(work, capsys):
    assert main(["diff", "a", "b.safetensors", "-o", "patch", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "patch" in captured.out
    a = load_file(work / "a" / "model.safetensors")["w"]
    b = load_file(work / "b.safetensors")["w"]
    torch.testing.assert_close(PatchSource(work / "patch").read("w"), b - a)


@pytest.mark.parametrize(
    ("target", "relation"),
    [("a", "is the checkpoint A"), ("b.safetensors", "is the checkpoint B"), (".", "contains")],
)
def test_overwrite_never_replaces_an_input(work, capsys, target, relation):
    err = refused(["diff", "a", "b.safetensors", "-o", target, "--overwrite", "--quiet"], capsys, work)
    assert relation in err and "would destroy an input" in err
    assert len(err.strip().splitlines()) == 1


def test_symlink_to_an_input_is_the_input(work, capsys):
    (work / "link").symlink_to(work / "a")
    err = refused(["diff", "a", "b.safetensors", "-o", "link", "--overwrite", "--quiet"], capsys, work)
    assert "is the checkpoint A" in err


@pytest.mark.parametrize("density", ["0", "-0.5", "1.5", "nan"])
def test_density_outside_zero_one(work, capsys, density):
    err = refused(["diff", "a", "b.safetensors", "-o", "patch", "--density", density], capsys, work)
    assert "--density" in err


def test_unknown_dtype_names_the_flag(work, capsys):
    err = refused(["diff", "a", "b.safetensors", "-o", "patch", "--dtype", "int4"], capsys, work)
    assert "--dtype: unknown dtype 'int4'" in err and len(err.strip().splitlines()) == 1


def test_existing_output_needs_overwrite(work, capsys):
    assert main(["diff", "a", "b.safetensors", "-o", "patch", "--quiet"]) == 0
    capsys.readouterr()
    assert "--overwrite" in refused(["diff", "a", "b.safetensors", "-o", "patch"], capsys, work)
    assert main(["diff", "a", "b.safetensors", "-o", "patch", "--quiet", "--overwrite"]) == 0


def test_output_under_an_unknown_user(work, capsys):
    err = refused(["diff", "a", "b.safetensors", "-o", "~nosuchuser-modelfuse/p"], capsys, work)
    assert "--out: '~nosuchuser-modelfuse/p': no such user" in err


def test_diff_says_which_stale_folder_of_a_killed_run_it_removed(work: Path, capsys) -> None:
    import socket
    import subprocess
    import sys

    from modelfuse.checkpoint.writer import MARKER_NAME

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / ".p.tmp-0000abcd"
    stale.mkdir()
    (stale / MARKER_NAME).write_text(
        f"modelfuse-partial pid={dead.pid} host={socket.gethostname()}\n"
    )
    assert main(["diff", "a", "b.safetensors", "-o", "p", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"modelfuse: removed {stale.resolve()}, the temporary folder of an interrupted "
        f"modelfuse run (process {dead.pid}, no longer running)\n"
    )
    assert not stale.exists() and (work / "p").is_dir()
