"""The writer never loses data: failed renames, killed runs, full disks with threads, interrupts."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoint_testing import leftovers
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.checkpoint import CheckpointWriter
from modelfuse.checkpoint import writer as writer_module
from modelfuse.checkpoint.writer import MARKER_NAME
from modelfuse.cli import main
from modelfuse.errors import OutputError

PLAN = [("a", (4,), torch.float32), ("b", (2,), torch.float32)]


def _fill(writer: CheckpointWriter) -> None:
    writer.write("a", torch.arange(4.0))
    writer.write("b", torch.ones(2))


def _previous(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An existing OUT with two files, and their bytes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous weights")
    (out / "README.md").write_text("previous card")
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _failing_rename(monkeypatch, fails: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Make os.rename fail (EACCES) for each (source name prefix, target name) in ``fails``."""
    real = os.rename
    calls: list[tuple[str, str]] = []

    def rename(source, target, *args, **kwargs):
        pair = (Path(source).name, Path(target).name)
        calls.append(pair)
        for prefix, name in fails:
            if pair[0].startswith(prefix) and pair[1] == name:
                raise PermissionError(errno.EACCES, "Permission denied")
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(writer_module.os, "rename", rename)
    return calls


# A failed rename never leaves an empty .OUT.old-* folder and never loses the previous OUT.


def test_failed_move_of_the_previous_output_keeps_it(tmp_path: Path, monkeypatch) -> None:
    out, before = _previous(tmp_path)
    _failing_rename(monkeypatch, [("out", "previous")])
    with pytest.raises(OutputError) as caught:
        with CheckpointWriter(out, PLAN, overwrite=True) as writer:
            _fill(writer)
            writer.commit()
    message = str(caught.value)
    assert "Permission denied" in message and "\n" not in message
    assert _contents(out) == before
    assert leftovers(tmp_path, "out") == []


def test_failed_move_of_the_new_output_puts_the_previous_back(tmp_path: Path, monkeypatch) -> None:
    out, before = _previous(tmp_path)
    calls = _failing_rename(monkeypatch, [(".out.tmp-", "out")])
    with pytest.raises(OutputError, match="Permission denied"):
        with CheckpointWriter(out, PLAN, overwrite=True) as writer:
            _fill(writer)
            writer.commit()
    assert [c[1] for c in calls] == ["previous", "out", "out"]  # moved aside, failed, moved back
    assert _contents(out) == before
    assert leftovers(tmp_path, "out") == []


def test_when_even_moving_back_fails_the_previous_output_is_kept_and_named(
    tmp_path: Path, monkeypatch
) -> None:
    out, before = _previous(tmp_path)
    _failing_rename(monkeypatch, [(".out.tmp-", "out"), ("previous", "out")])
    with pytest.raises(OutputError) as caught:
        with CheckpointWriter(out, PLAN, overwrite=True) as writer:
            _fill(writer)
            writer.commit()
    message = str(caught.value)
    backups = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(backups) == 1 and _contents(backups[0] / "previous") == before
    assert f"the previous {out} is kept whole in {backups[0] / 'previous'}" in message
    assert f"`mv {backups[0] / 'previous'} {out}`" in message and "\n" not in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")] == []


def test_failed_backup_folder_creation_keeps_the_previous_output(
    tmp_path: Path, monkeypatch
) -> None:
    out, before = _previous(tmp_path)
    real = writer_module._make_sibling

    def make_sibling(target: Path, tag: str) -> Path:
        if tag == "old":  # the parent turned read-only after the temporary folder was made
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(target, tag)

    monkeypatch.setattr(writer_module, "_make_sibling", make_sibling)
    with pytest.raises(OutputError, match="Permission denied"):
        with CheckpointWriter(out, PLAN, overwrite=True) as writer:
            _fill(writer)
            writer.commit()
    assert _contents(out) == before
    assert leftovers(tmp_path, "out") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_parent_made_read_only_before_commit(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    out, before = _previous(parent)
    try:
        with pytest.raises(OutputError) as caught:
            with CheckpointWriter(out, PLAN, overwrite=True) as writer:
                _fill(writer)
                parent.chmod(0o555)
                writer.commit()
        message = str(caught.value)
        assert "\n" not in message
        assert _contents(out) == before
        assert [p for p in parent.iterdir() if p.name.startswith(".out.old-")] == []
        stayed = [p for p in parent.iterdir() if p.name.startswith(".out.tmp-")]
        if stayed:  # a read-only folder keeps its entries: the error says which one to remove
            assert f"the temporary folder {stayed[0]} could not be removed" in message
    finally:
        parent.chmod(0o755)


def test_failed_rename_without_overwrite_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    _failing_rename(monkeypatch, [(".out.tmp-", "out")])
    with pytest.raises(OutputError, match="Permission denied"):
        with CheckpointWriter(out, PLAN) as writer:
            _fill(writer)
            writer.commit()
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_the_marker_never_reaches_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, PLAN) as writer:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        marker = (tmp / MARKER_NAME).read_text()
        assert marker == f"modelfuse-partial pid={os.getpid()} host={socket.gethostname()}\n"
        _fill(writer)
        with pytest.raises(ValueError, match="must be a relative path"):
            writer.add_file(MARKER_NAME, "mine")
        writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


# After a SIGKILL, the next writer to the same OUT removes the folder it recognises as its own.


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _stale(parent: Path, name: str, marker: str | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half written")
    if marker is not None:
        (folder / MARKER_NAME).write_text(marker)
    return folder


def test_a_killed_writer_s_folder_is_removed_by_the_next_one(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys, torch\n"
        "from modelfuse.checkpoint import CheckpointWriter\n"
        "w = CheckpointWriter(sys.argv[1], [('a', (4,), torch.float32)])\n"
        "w.write('a', torch.ones(4))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    pid = int((stale / MARKER_NAME).read_text().split("pid=")[1].split()[0])
    with CheckpointWriter(out, PLAN) as writer:
        assert writer.notes == [
            f"removed {stale}, the temporary folder of an interrupted modelfuse run "
            f"(process {pid}, no longer running)"
        ]
        _fill(writer)
        writer.commit()
    assert not stale.exists() and leftovers(tmp_path, "out") == []
    assert load_file(out / "model.safetensors")["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_folders_not_recognised_as_stale_are_never_touched(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = _dead_pid()
    untouched = [
        _stale(tmp_path, ".out.tmp-00000001", None),  # no marker
        _stale(
            tmp_path, ".out.tmp-00000002", f"modelfuse-partial pid={os.getppid()} host={host}\n"
        ),
        _stale(tmp_path, ".out.tmp-00000003", f"modelfuse-partial pid={dead} host=elsewhere\n"),
        _stale(tmp_path, ".out.tmp-00000004", f"pid={dead} host={host}\n"),  # not our format
        _stale(tmp_path, ".out.tmp-xyz", f"modelfuse-partial pid={dead} host={host}\n"),
        _stale(tmp_path, ".out.old-00000005", f"modelfuse-partial pid={dead} host={host}\n"),
        _stale(tmp_path, ".other.tmp-00000006", f"modelfuse-partial pid={dead} host={host}\n"),
        _stale(tmp_path, ".out.tmp-00000007", f"modelfuse-partial pid={os.getpid()} host={host}\n"),
    ]
    target = _stale(tmp_path, "elsewhere", f"modelfuse-partial pid={dead} host={host}\n")
    (tmp_path / ".out.tmp-00000008").symlink_to(target)  # a link to a folder: not ours
    removed = _stale(tmp_path, ".out.tmp-0000000a", f"modelfuse-partial pid={dead} host={host}\n")
    before = {p: _contents(p) for p in [*untouched, target]}
    with CheckpointWriter(tmp_path / "out", PLAN) as writer:
        assert len(writer.notes) == 1 and str(removed) in writer.notes[0]
        _fill(writer)
        writer.commit()
    assert not removed.exists()
    assert {p: _contents(p) for p in [*untouched, target]} == before
    assert (tmp_path / ".out.tmp-00000008").is_symlink()


def test_the_merge_says_it_removed_a_stale_folder(tmp_path: Path, capsys) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nmodels: [{tmp_path / 'a.safetensors'}, {tmp_path / 'b.safetensors'}]\n"
    )
    marker = f"modelfuse-partial pid={_dead_pid()} host={socket.gethostname()}\n"
    stale = _stale(tmp_path, ".out.tmp-0123abcd", marker)
    result = modelfuse.merge(str(config), tmp_path / "out")
    assert any(note.startswith(f"removed {stale}, the temporary folder") for note in result.notes)
    assert not stale.exists()
    stale = _stale(tmp_path, ".again.tmp-0123abcd", marker)
    assert main(["merge", str(config), str(tmp_path / "again")]) == 0  # notes: not --quiet
    err = capsys.readouterr().err
    assert f"modelfuse: removed {stale}, the temporary folder of an interrupted" in err
    assert not stale.exists()


# A full disk is reported as such whichever thread hits it first.


def test_writes_after_another_thread_s_full_disk_repeat_its_reason(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}
    real = writer_module._write_at
    failed = threading.Event()

    def fills_up(fd: int, data: memoryview, offset: int) -> None:
        if threading.current_thread().name == "first":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    errors: dict[str, str] = {}
    with CheckpointWriter(out, [(n, (64,), torch.float32) for n in tensors]) as writer:
        monkeypatch.setattr(writer_module, "_write_at", fills_up)

        def first() -> None:
            try:
                writer.write("t0", tensors["t0"])
            except OutputError as exc:
                errors["first"] = str(exc)
            failed.set()

        def second() -> None:
            failed.wait(10)
            for name in ["t1", "t2"]:
                try:
                    writer.write(name, tensors[name])
                except OutputError as exc:
                    errors.setdefault("second", str(exc))

        workers = [threading.Thread(target=f, name=f.__name__) for f in (first, second)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        with pytest.raises(OutputError) as at_commit:
            writer.commit()
    assert errors["first"].startswith(f"{out}: the disk filled up while writing tensor 't0'")
    assert errors["second"] == errors["first"] == str(at_commit.value)
    assert not out.exists() and leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("attempt", range(4))
def test_merge_with_two_threads_reports_the_full_disk(tmp_path: Path, monkeypatch, attempt) -> None:
    paths = []
    for i in range(2):
        state = {f"layers.{j}.w": torch.full((256,), float(i + j)) for j in range(12)}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    real = writer_module._write_at
    count = {"n": 0}
    lock = threading.Lock()

    def fills_up(fd: int, data: memoryview, offset: int) -> None:
        with lock:
            count["n"] += 1
            number = count["n"]
        if number == 2 + attempt:  # one tensor's write fails; the others keep coming
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.002)
        real(fd, data, offset)

    monkeypatch.setattr(writer_module, "_write_at", fills_up)
    config = {"merge_method": "linear", "models": [str(p) for p in paths]}
    with pytest.raises(OutputError) as caught:
        modelfuse.merge(config, tmp_path / "out", threads=2)
    assert "the disk filled up while writing tensor" in str(caught.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# Interrupts: KeyboardInterrupt in the main thread while workers write; SIGTERM to the CLI.


def test_keyboard_interrupt_while_workers_write_removes_the_temporary_folder(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    tensors = {f"t{i}": torch.full((32,), float(i)) for i in range(40)}
    real = writer_module._write_at
    writing = threading.Event()

    def slow(fd: int, data: memoryview, offset: int) -> None:
        if len(data) == 128:  # a tensor, not a header
            writing.set()
            time.sleep(0.01)
        real(fd, data, offset)

    monkeypatch.setattr(writer_module, "_write_at", slow)
    outcomes: list[str] = []

    def work(writer: CheckpointWriter, names: list[str]) -> None:
        for name in names:
            try:
                writer.write(name, tensors[name])
            except OutputError:
                outcomes.append("refused")
                return
        outcomes.append("finished")

    names = list(tensors)
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, [(n, (32,), torch.float32) for n in tensors]) as writer:
            workers = [threading.Thread(target=work, args=(writer, names[i::2])) for i in range(2)]
            for worker in workers:
                worker.start()
            assert writing.wait(10)
            raise KeyboardInterrupt
    for worker in workers:
        worker.join()
    assert outcomes == ["refused", "refused"]  # later writes are refused, not written anywhere
    assert not out.exists() and leftovers(tmp_path, "out") == []


SLOW_MERGE = """
import sys, time
from pathlib import Path
from modelfuse.checkpoint import writer
from modelfuse.cli import main

real, started = writer._write_at, Path(sys.argv[1])

def slow(fd, data, offset):
    started.touch()
    time.sleep(0.05)
    real(fd, data, offset)

writer._write_at = slow
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_a_merge_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        state = {f"layers.{j}.w": torch.full((1024,), float(i + j)) for j in range(200)}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels: [{paths[0]}, {paths[1]}]\n")
    before = {p: p.read_bytes() for p in [*paths, config]}
    started = tmp_path / "started"
    out = tmp_path / "out"
    command = [sys.executable, "-c", SLOW_MERGE, str(started)]
    process = subprocess.Popen(
        [*command, "merge", str(config), str(out), "--quiet", "--threads", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), process.communicate()
        time.sleep(0.2)  # several tensors in flight in both threads
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["modelfuse: interrupted; nothing was written"]
    assert not out.exists() and leftovers(tmp_path, "out") == []
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("host", ["h\u00f6st", "with space", ""])
def test_unusual_host_names_still_give_a_readable_marker(tmp_path: Path, monkeypatch, host) -> None:
    monkeypatch.setattr(writer_module.socket, "gethostname", lambda: host)
    dead = _dead_pid()
    with CheckpointWriter(tmp_path / "out", PLAN) as writer:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        text = (tmp / MARKER_NAME).read_text(encoding="ascii")
        # the same host reading the marker of a process that ended recognises it
        (tmp / MARKER_NAME).write_text(text.replace(f"pid={os.getpid()}", f"pid={dead}"))
        assert writer_module._stale_owner(tmp) == dead
        writer.abort()


def test_an_interrupt_inside_the_main_thread_s_own_write_cannot_hang_the_cleanup(
    tmp_path: Path,
) -> None:
    # A KeyboardInterrupt can land while the interrupted thread re-takes the writer's lock
    # to finish its bookkeeping: its own write then still counts as in flight. The cleanup
    # waits for other threads' writes only, so it neither hangs nor leaves the folder.
    out = tmp_path / "out"
    finished = threading.Event()

    def scenario() -> None:
        try:
            with CheckpointWriter(out, PLAN) as writer:
                with writer._lock:
                    writer._active[threading.get_ident()] += 1  # as the interrupt leaves it
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            finished.set()

    runner = threading.Thread(target=scenario, daemon=True)
    runner.start()
    runner.join(20)
    assert finished.is_set()
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_an_interrupt_while_the_headers_are_written_leaves_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    def interrupted(fd: int, data: memoryview, offset: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "_write_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        CheckpointWriter(tmp_path / "out", PLAN)
    assert leftovers(tmp_path, "out") == []


def _cli_models(tmp_path: Path) -> Path:
    for i in range(2):
        state = {f"layers.{j}.w": torch.full((256,), float(i + j)) for j in range(12)}
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nmodels: [{tmp_path / 'm0.safetensors'}, "
        f"{tmp_path / 'm1.safetensors'}]\n"
    )
    return config


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: ") and "Traceback" not in err
    return lines[0]


def test_cli_full_disk_with_two_threads(tmp_path: Path, monkeypatch, capsys) -> None:
    config = _cli_models(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    real = writer_module._write_at
    count = {"n": 0}
    lock = threading.Lock()

    def fills_up(fd: int, data: memoryview, offset: int) -> None:
        with lock:
            count["n"] += 1
            number = count["n"]
        if number == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.002)
        real(fd, data, offset)

    monkeypatch.setattr(writer_module, "_write_at", fills_up)
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--threads", "2"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "the disk filled up while writing tensor" in line
    assert "free space and run again" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_failed_replacement_keeps_the_previous_output(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    config = _cli_models(tmp_path)
    out, before = _previous(tmp_path)
    _failing_rename(monkeypatch, [(".out.tmp-", "out")])
    code = main(["merge", str(config), str(out), "--quiet", "--overwrite"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "Permission denied" in line
    assert _contents(out) == before
    assert leftovers(tmp_path, "out") == []
