"""Usage errors of every verb: click's usage message or one line, exit 2, never a traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

from modelfuse.cli import main
from modelfuse.cli._app import app

RUN = [sys.executable, "-c", "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))"]

# verb -> (arguments of a run with a typo'd option, one missing a required
# argument, one with a value out of range, and the flag that value belongs to)
CASES: dict[str, tuple[list[str], list[str], list[str], str]] = {
    "merge": (
        ["merge", "c.yaml", "out", "--thread", "2"],
        ["merge"],
        ["merge", "c.yaml", "out", "--threads", "0"],
        "--threads",
    ),
    "methods": (["methods", "--verbose"], ["methods", "ties", "extra"], ["methods", "nosuch"], ""),
    "demo": (["demo", "--quik"], ["demo", "--seed"], ["demo", "--seed", "-1"], "--seed"),
    "diff": (
        ["diff", "a", "b", "-o", "p", "--densty", "0.1"],
        ["diff", "a"],
        ["diff", "a", "b", "-o", "p", "--density", "1.5"],
        "--density",
    ),
    "extract-lora": (
        ["extract-lora", "a", "b", "-o", "lora", "--rnk", "2"],
        ["extract-lora", "a", "-o", "lora", "--rank", "2"],
        ["extract-lora", "a", "b", "-o", "lora", "--rank", "0"],
        "--rank",
    ),
    "moe": (
        ["moe", "moe.yaml", "out", "--random-sed", "1"],
        ["moe"],
        ["moe", "moe.yaml", "out", "--random-seed", "-1"],
        "--random-seed",
    ),
    "ensemble": (
        ["ensemble", "-p", "a.npy", "-o", "e.json", "--methd", "soft"],
        ["ensemble", "-p", "a.npy"],
        ["ensemble", "-p", "a.npy", "-y", "y.npy", "-o", "e.json", "--n-rounds", "0"],
        "--n-rounds",
    ),
    "compare": (
        ["compare", "-p", "a.npy", "-y", "y.npy", "-o", "cmp", "--referense", "a"],
        ["compare", "-p", "a.npy", "-o", "cmp"],
        ["compare", "-p", "a.npy", "-y", "y.npy", "-o", "cmp", "--confidence", "1.5"],
        "--confidence",
    ),
    "statistics": (
        ["statistics", "fisher", "--factory", "m:f", "-o", "s.safetensors", "--batchsize", "2"],
        ["statistics"],
        ["statistics", "fisher", "--factory", "m:f", "-o", "s.safetensors", "--batch-size", "0"],
        "--batch-size",
    ),
    "calibrate": (
        ["calibrate", "-s", "s.npy", "-y", "y.npy", "-o", "c.json", "--metod", "temperature"],
        ["calibrate", "-y", "y.npy", "-o", "c.json"],
        ["calibrate", "-s", "s.npy", "-y", "y.npy", "-o", "c.json", "--n-bins", "0"],
        "--n-bins",
    ),
    "inspect": (
        ["inspect", "c.yaml", "-o", "out", "--densty", "0.2"],
        ["inspect"],
        ["inspect", "c.yaml", "-o", "out", "--density", "1.5"],
        "--density",
    ),
    "calibration-report": (
        ["calibration-report", "-p", "p.npy", "-y", "y.npy", "-o", "r", "--nbins", "3"],
        ["calibration-report", "-p", "p.npy", "-o", "r"],
        ["calibration-report", "-p", "p.npy", "-y", "y.npy", "-o", "r", "--n-bins", "0"],
        "--n-bins",
    ),
    "distill": (
        ["distill", "--factory", "m:f", "-x", "x.npy", "-t", "a.pt", "-o", "s.safetensors",
         "--epoch", "2"],
        ["distill", "--factory", "m:f", "-o", "s.safetensors"],
        ["distill", "--factory", "m:f", "-x", "x.npy", "-t", "a.pt", "-o", "s.safetensors",
         "--temperature", "0"],
        "--temperature",
    ),
}


# options of a verb beyond its CASES row: (arguments, the flag the error must name, or "")
_STATS = ["statistics", "fisher", "--factory", "m:f", "-o", "s.safetensors"]
_REPORT = ["calibration-report", "-p", "p.npy", "-y", "y.npy", "-o", "r"]
MORE_CASES: list[tuple[list[str], str]] = [
    ([*_STATS, "--workers", "0"], "--workers"),
    ([*_STATS, "--worker", "2"], "--worker"),
    ([*_STATS, "--ray-adress", "auto"], "--ray-adress"),
    ([*_STATS, "--ray-address"], "--ray-address"),
    ([*_REPORT, "--conformal", "0"], "--conformal"),
    ([*_REPORT, "--conformal", "1.5"], "--conformal"),
    ([*_REPORT, "--conformal", "nan"], "--conformal"),
    ([*_REPORT, "--conformal", "abc"], "--conformal"),
    ([*_REPORT, "--conformal"], "--conformal"),
    ([*_REPORT, "--conformal", "0.1", "--seed", "-1"], "--seed"),
    ([*_REPORT, "--risk-coverag"], "--risk-coverag"),
]


def _check_usage_error(err: str, flag: str = "") -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    if flag:
        assert flag in err, err


def test_every_verb_is_covered() -> None:
    registered = {command.name for command in app.registered_commands}
    assert registered == set(CASES)


@pytest.mark.parametrize("verb", sorted(CASES))
@pytest.mark.parametrize("case", ["typo", "missing", "range"])
def test_usage_errors_exit_2_without_traceback(
    verb: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    typo, missing, out_of_range, flag = CASES[verb]
    argv = {"typo": typo, "missing": missing, "range": out_of_range}[case]
    assert main(argv) == 2
    _check_usage_error(capsys.readouterr().err, flag if case == "range" else "")
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("argv, flag", MORE_CASES, ids=[" ".join(c[0][6:]) for c in MORE_CASES])
def test_more_usage_errors_exit_2_without_traceback(
    argv: list[str], flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _check_usage_error(capsys.readouterr().err, flag)
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_no_arguments_prints_usage_and_exits_2(capsys) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    shown = captured.out + captured.err  # typer prints the help through rich, on stdout
    assert "Usage:" in shown and "merge" in shown and "Traceback" not in shown


def test_unknown_command(capsys) -> None:
    assert main(["merj"]) == 2
    err = capsys.readouterr().err
    assert "No such command 'merj'" in err and "Traceback" not in err
    _check_usage_error(err)
    assert err.count("Did you mean") <= 1, err  # typer's suggestion repeats click's


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["merge", "--no-such-flag"], r"No such option:? '?--no-such-flag'?.*"),
        (["merge", "soup.yaml", "out", "--threads"], r"Option '--threads' requires an argument\."),
        (["extract-lora", "a", "b", "c", "--rank", "0"], r"Invalid value for '--rank'.*"),
        (["merge"], r"Missing argument 'CONFIG'\."),
    ],
)
def test_usage_errors_are_one_line_naming_the_verbs_help(argv, pattern, capsys) -> None:
    """click's usage line and hint line are folded into one: the message, then where the
    flags are listed (an option missing its value has no click context: the verb is
    taken from the arguments)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    help_hint = re.escape(f" (see 'modelfuse {argv[0]} --help')")
    assert re.fullmatch(f"modelfuse: error: {pattern}{help_hint}\n", err), err


@pytest.mark.parametrize("argv", [[], ["merge"], ["compare"]])
def test_dash_h_is_help(argv: list[str], capsys) -> None:
    assert main([*argv, "-h"]) == 0
    short = capsys.readouterr().out
    assert main([*argv, "--help"]) == 0
    assert capsys.readouterr().out == short and "Usage:" in short


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"modelfuse {version('modelfuse')}"


def test_library_warnings_print_one_line_each(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import modelfuse.merge.registry as registry

    real = registry.get_method

    def warn_twice(*args, **kwargs):
        for _ in range(2):
            warnings.warn(
                "first line of a library warning\nsecond line\n  more", RuntimeWarning,
                stacklevel=2,
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "get_method", warn_twice)
    assert main(["methods", "linear"]) == 0
    err = capsys.readouterr().err
    assert err == "modelfuse: warning: first line of a library warning\n"


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import modelfuse.merge.registry as registry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "get_method", interrupted)
    assert main(["methods", "linear"]) == 130
    assert capsys.readouterr().err == "modelfuse: interrupted; nothing was written\n"


def test_sigterm_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    main(["--version"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_usage_error_through_a_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [*RUN, "merge", "--no-such-flag"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    _check_usage_error(done.stderr)
    # click 8.1-8.3 (vendored by typer 0.29) and click 8.5 word it differently
    assert re.search(r"No such option:? '?--no-such-flag", done.stderr), done.stderr


def test_help_needs_no_optional_dependency(tmp_path: Path) -> None:
    """Every help runs with the extras made unimportable and without heavy libraries."""
    blocker = textwrap.dedent(
        """
        import sys
        import importlib.util
        BLOCKED = {"transformers", "tokenizers", "peft", "flwr", "ray"}
        if importlib.util.find_spec("typer._click") is not None:
            BLOCKED.add("click")  # typer carries its own click: the CLI must not need another
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        from modelfuse.cli import main
        codes = [main(["--help"])] + [main([verb, "--help"]) for verb in sys.argv[1:]]
        heavy = {"torch", "sklearn", "scipy", "matplotlib", "safetensors"}
        loaded = heavy & {name.split(".")[0] for name in sys.modules}
        if loaded:  # help stays fast: heavy libraries load inside the commands
            sys.exit(f"--help imported {sorted(loaded)}")
        sys.exit(max(codes))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker, *sorted(CASES)], capture_output=True, text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_demo_leaves_nothing(signum: int, tmp_path: Path) -> None:
    """Ctrl-C and SIGTERM (timeout, Slurm, docker) end a run with 130 and no output."""
    process = subprocess.Popen(
        [*RUN, "demo", "--quick", "-o", "demo-out"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    # wait until the run is under way (its first stage is announced), then stop it
    for line in process.stdout:
        if "modelfuse demo" in line:
            break
    time.sleep(1.0)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "modelfuse: interrupted; nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
