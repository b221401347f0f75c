"""``modelfuse distill``: the library's student, written atomically; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelfuse.cli import main
from modelfuse.distill import Distiller, teacher_logits

FACTORY = """
from torch import nn


def make():
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def pair():
    return make(), [[0.0]]


def wide():
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 5))


def not_a_model():
    return 42
"""


def _make() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def _seeded(seed: int, n_out: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, n_out))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a factory module, data and three teacher checkpoints; the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "distill_models"]:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "distill_models.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", rng.integers(0, 4, size=120))
    np.save(tmp_path / "xv.npy", rng.normal(size=(30, 8)).astype(np.float32))
    np.save(tmp_path / "yv.npy", rng.integers(0, 4, size=30))
    with torch.random.fork_rng(devices=[]):
        for i in range(3):
            save_file(_seeded(i).state_dict(), tmp_path / f"m{i}.safetensors")
        save_file(_seeded(9, n_out=5).state_dict(), tmp_path / "wide.safetensors")
        save_file(_seeded(7).state_dict(), tmp_path / "init.safetensors")
    return tmp_path


BASE = [
    "distill",
    "--factory",
    "distill_models:make",
    "-x",
    "x.npy",
    "--threads",
    "1",
    "--quiet",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--lr",
    "0.01",
]
TEACHERS = ["-t", "m0.safetensors", "m1.safetensors", "m2.safetensors"]


def _members(folder: Path) -> list[nn.Module]:
    members = []
    for i in range(3):
        net = _make()
        net.load_state_dict(load_file(folder / f"m{i}.safetensors"))
        members.append(net)
    return members


def _library_student(folder: Path, **fit) -> dict[str, torch.Tensor]:
    """The student the library gives for BASE's settings, as an independent reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the CLI calls the factory with --seed (0) as torch's seed
        student = _make()
    init = fit.pop("init", None)
    if init is not None:
        student.load_state_dict(load_file(folder / init))
    options = {"max_epochs": 3, "batch_size": 32, "lr": 0.01, "n_threads": 1}
    options.update(fit.pop("options", {}))
    x = np.load(folder / "x.npy")
    d = Distiller(student, _members(folder), **options).fit(x, **fit)
    return d.student_.state_dict()


def _ok(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    return captured.out


def test_distils_the_ensemble_of_checkpoints_as_the_library_does(work: Path, capsys) -> None:
    out = _ok(
        [*BASE, *TEACHERS, "-y", "y.npy", "--validation-fraction", "0.25", "-o", "s.safetensors"],
        capsys,
    )
    assert out.startswith("wrote the student distilled from 3 teacher checkpoints")
    written = load_file(work / "s.safetensors")
    expected = _library_student(
        work, y=np.load(work / "y.npy"), options={"validation_fraction": 0.25}
    )
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    summary = json.loads((work / "s.json").read_text())
    assert summary["n_train"] == 90 and summary["n_val"] == 30 and summary["n_classes"] == 4
    assert len(summary["history"]["train_loss"]) == summary["epochs_run"] == 3
    assert len(summary["history"]["val_loss"]) == 3
    assert summary["best_epoch"] == int(np.argmin(summary["history"]["val_loss"])) + 1
    assert 0 <= summary["val_agreement"] <= 1 and summary["teacher"]["m1"] == "m1.safetensors"
    first = (work / "s.safetensors").read_bytes()
    _ok(
        [
            *BASE,
            *TEACHERS,
            "-y",
            "y.npy",
            "--validation-fraction",
            "0.25",
            "-o",
            "again.safetensors",
        ],
        capsys,
    )
    assert (work / "again.safetensors").read_bytes() == first  # same seed, same bytes


def test_teacher_logits_file_gives_the_same_student(work: Path, capsys) -> None:
    x = np.load(work / "x.npy")
    log_p = teacher_logits(_members(work), x).numpy()
    np.save(work / "t_logits.npy", log_p)
    np.save(work / "t_probs.npy", np.exp(log_p.astype(np.float64)))
    _ok([*BASE, *TEACHERS, "-o", "a.safetensors"], capsys)
    _ok([*BASE, "--teacher-logits", "t_logits.npy", "-o", "b.safetensors"], capsys)
    a, b = load_file(work / "a.safetensors"), load_file(work / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _ok([*BASE, "--teacher-logits", "t_probs.npy", "-o", "c.safetensors"], capsys)
    c = load_file(work / "c.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-4) for k in a)


def test_student_starts_from_a_checkpoint_and_validation_arrays(work: Path, capsys) -> None:
    _ok(
        [
            *BASE,
            *TEACHERS,
            "--student",
            "init.safetensors",
            "--val-inputs",
            "xv.npy",
            "--val-labels",
            "yv.npy",
            "-y",
            "y.npy",
            "-o",
            "s.safetensors",
        ],
        capsys,
    )
    expected = _library_student(
        work,
        init="init.safetensors",
        y=np.load(work / "y.npy"),
        X_val=np.load(work / "xv.npy"),
        y_val=np.load(work / "yv.npy"),
    )
    written = load_file(work / "s.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    summary = json.loads((work / "s.json").read_text())
    assert summary["student_init"] == "init.safetensors" and summary["n_val"] == 30


def test_overwrite_and_a_factory_returning_a_pair(work: Path, capsys) -> None:
    (work / "s.safetensors").write_bytes(b"old")
    argv = [*BASE, *TEACHERS, "--summary", "report.json", "-o", "s.safetensors"]
    argv[2] = "distill_models:pair"
    assert main(argv) == 2
    assert (work / "s.safetensors").read_bytes() == b"old"
    capsys.readouterr()
    _ok([*argv, "--overwrite"], capsys)
    assert set(load_file(work / "s.safetensors")) == set(_make().state_dict())
    assert (work / "report.json").is_file() and not (work / "s.json").exists()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _nan_inputs(folder: Path) -> None:
    x = np.load(folder / "x.npy")
    x[5, 2] = np.nan
    np.save(folder / "x_nan.npy", x)


def _prepare(folder: Path) -> None:
    _nan_inputs(folder)
    np.save(folder / "y_big.npy", np.full(120, 4))
    np.save(folder / "y_short.npy", np.zeros(119, dtype=int))
    np.save(folder / "x_wide.npy", np.zeros((120, 9), dtype=np.float32))
    np.save(folder / "t_short.npy", np.zeros((119, 4), dtype=np.float32))
    np.save(folder / "probs.npy", np.full((120, 4), 0.25))
    np.save(folder / "one_class.npy", np.ones((120, 1)))
    (folder / "exists.safetensors").write_bytes(b"keep")


BAD: list[tuple[list[str], str]] = [
    (
        [
            "distill",
            "--factory",
            "no_such_module_xyz:make",
            "-x",
            "x.npy",
            *TEACHERS,
            "-o",
            "s.safetensors",
        ],
        "--factory: cannot import module 'no_such_module_xyz'",
    ),
    (
        [
            "distill",
            "--factory",
            "distill_models:nothing",
            "-x",
            "x.npy",
            *TEACHERS,
            "-o",
            "s.safetensors",
        ],
        "has no function 'nothing'",
    ),
    (
        [
            "distill",
            "--factory",
            "distill_models:not_a_model",
            "-x",
            "x.npy",
            *TEACHERS,
            "-o",
            "s.safetensors",
        ],
        "returned int; expected a torch.nn.Module",
    ),
    (
        [*BASE[:3], "-x", "x_nan.npy", *TEACHERS, "-o", "s.safetensors"],
        "--inputs x_nan.npy: 1 NaN or inf values, the first at index (5, 2)",
    ),
    (
        [*BASE, *TEACHERS, "-y", "y_big.npy", "-o", "s.safetensors"],
        r"--labels y_big.npy: labels must lie in [0, 4)",
    ),
    ([*BASE, *TEACHERS, "-y", "y_short.npy", "-o", "s.safetensors"], "119 labels for 120"),
    (
        [*BASE[:3], "-x", "x_wide.npy", *TEACHERS, "-o", "s.safetensors"],
        "the factory's model cannot run on x_wide.npy of shape (120, 9)",
    ),
    (
        [*BASE, "-t", "wide.safetensors", "-o", "s.safetensors"],
        "--teacher wide.safetensors: does not fit the model of --factory distill_models:make",
    ),
    (
        [*BASE, *TEACHERS, "--student", "wide.safetensors", "-o", "s.safetensors"],
        "--student wide.safetensors: does not fit",
    ),
    ([*BASE, "-t", "missing.safetensors", "-o", "s.safetensors"], "missing.safetensors"),
    (
        [*BASE, "--teacher-logits", "t_short.npy", "-o", "s.safetensors"],
        "--teacher-logits t_short.npy: shape (119, 4), but --inputs x.npy has 120 rows",
    ),
    (
        [*BASE, "--teacher-logits", "probs.npy", "--kind", "logits", "-o", "s.safetensors"],
        "pass --kind probabilities",
    ),
    ([*BASE, *TEACHERS, "--teacher-logits", "probs.npy", "-o", "s.safetensors"], "not both"),
    (
        [*BASE, "--teacher-logits", "one_class.npy", "-o", "s.safetensors"],
        "with at least 2 classes",
    ),
    (
        [
            "distill",
            "--factory",
            "distill_models:wide",
            "-x",
            "x.npy",
            "--teacher-logits",
            "probs.npy",
            "-o",
            "s.safetensors",
        ],
        "--factory distill_models:wide: the model returned (64, 5) for a batch of 64 inputs",
    ),
    ([*BASE, "-o", "s.safetensors"], "no teacher"),
    (
        [
            *BASE,
            *TEACHERS,
            "--val-inputs",
            "xv.npy",
            "--validation-fraction",
            "0.2",
            "-o",
            "s.safetensors",
        ],
        "either --val-inputs or --validation-fraction",
    ),
    (
        [*BASE, "--teacher-logits", "probs.npy", "--val-inputs", "xv.npy", "-o", "s.safetensors"],
        "needs --val-teacher-logits",
    ),
    ([*BASE, *TEACHERS, "--val-labels", "yv.npy", "-o", "s.safetensors"], "need --val-inputs"),
    (
        [*BASE, *TEACHERS, "--val-inputs", "x_wide.npy", "-o", "s.safetensors"],
        "--val-inputs x_wide.npy: rows of shape (9,)",
    ),
    (
        [*BASE, *TEACHERS, "--validation-fraction", "0.001", "-o", "s.safetensors"],
        "--validation-fraction: 0.001 of 120 samples",
    ),
    (
        [*BASE, *TEACHERS, "--optimizer", "lbfgs", "-o", "s.safetensors"],
        "--optimizer: unknown 'lbfgs'; expected one of adam, adamw, sgd",
    ),
    ([*BASE, *TEACHERS, "--kind", "softmax", "-o", "s.safetensors"], "--kind"),
    ([*BASE, *TEACHERS, "-o", "s.pt"], "the output must be a .safetensors file"),
    ([*BASE, *TEACHERS, "--summary", "s.txt", "-o", "s.safetensors"], "expected a .json file"),
    ([*BASE, *TEACHERS, "-o", "exists.safetensors"], "already exists"),
    ([*BASE, *TEACHERS, "-o", "m0.safetensors", "--overwrite"], "is the input of --teacher m0"),
    (
        [*BASE, *TEACHERS, "-o", "s.safetensors", "--summary", "x.npy", "--overwrite"],
        "expected a .json file",
    ),
    ([*BASE[:3], "-x", "nope.npy", *TEACHERS, "-o", "s.safetensors"], "nope.npy: no such file"),
    ([*BASE, *TEACHERS, "-t", "m0=m1.safetensors", "-o", "s.safetensors"], "given twice"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[w[:40] for _, w in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, words, work: Path, capsys) -> None:
    _prepare(work)
    before = _snapshot(work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    assert "Traceback" not in err
    assert words in lines[0], lines[0]
    assert _snapshot(work) == before  # nothing written, nothing touched


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--lr", "0"], "--lr"),
        (["--temperature", "nan"], "--temperature"),
        (["--validation-fraction", "1"], "--validation-fraction"),
        (["--patience", "0"], "--patience"),
        (["--epochs", "0"], "--epochs"),
        (["--seed", "-1"], "--seed"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--threads", "0"], "--threads"),
        (["--soft-onl"], "--soft-onl"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(extra, flag, work: Path, capsys) -> None:
    before = _snapshot(work)
    assert main([*BASE, *TEACHERS, "-o", "s.safetensors", *extra]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert _snapshot(work) == before


def test_interrupt_exits_130_and_writes_nothing(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Distiller, "fit", interrupted)
    before = _snapshot(work)
    assert main([*BASE, *TEACHERS, "-o", "s.safetensors"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert _snapshot(work) == before
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def test_progress_bar_on_stderr_unless_quiet(work: Path, capsys) -> None:
    argv = [word for word in BASE if word != "--quiet"]
    out = _ok([*argv, *TEACHERS, "-o", "s.safetensors"], capsys)
    assert out.startswith("wrote the student")
    # rich writes the bar to standard error (not a terminal here: drawn once at the end)
    assert main([*argv, *TEACHERS, "-o", "s.safetensors", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "distilling" in captured.err and "Traceback" not in captured.err
    assert "distilling" not in captured.out
