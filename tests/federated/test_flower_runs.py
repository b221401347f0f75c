"""The example Flower app (examples/federated) run by ``flwr run``, both ways Flower runs apps.

- the simulation engine: a SuperLink started with ``--simulation`` runs 4 virtual
  SuperNodes (Flower's simulation runtime);
- a deployment on localhost: a SuperLink and two SuperNodes as separate processes,
  talking over Flower's Fleet API on free loopback ports.

In both, ``flwr run`` submits the app from its folder (as ``flwr run .`` does),
the run finishes, the final model is written, and the central accuracy rises.
Nothing leaves the machine: telemetry, update checks and runtime dependency
installation are switched off, and every process started here is stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from safetensors.torch import load_file  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "federated"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(APP), env.get("PYTHONPATH", "")) if p),
        RAY_DISABLE_USAGE_STATS="1",
    )
    return env


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"SuperLink exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"SuperLink did not listen on {port}:\n{log.read_text()[-3000:]}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the process groups this test started (each in its own session), by their ids."""
    for process in reversed(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _run_app(tmp_path: Path, *, simulation: bool, overrides: str) -> tuple[dict, Path, str]:
    home = tmp_path / "flwr"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = _environment(home)
    out = tmp_path / "out" / "model.safetensors"
    processes: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    handles = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")  # closed once the processes are stopped
        handles.append(log)
        process = subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(process)
        return process

    superlink = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if simulation:
        superlink.append("--simulation")
    try:
        link = start("superlink", superlink)
        _wait_for_port(port, link, logs / "superlink.log")
        if not simulation:
            for i in range(2):
                start(
                    f"supernode{i}",
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2",
                    ],
                )
        command = [
            str(BIN / "flwr"),
            "run",
            str(APP),
            "here",
            "--stream",
            "-c",
            f"out='{out}' {overrides}",
        ]
        if simulation:
            command += ["--federation-config", "num-supernodes=4"]
        done = subprocess.run(
            command,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            stdin=subprocess.DEVNULL,
        )
    finally:
        _stop(processes)
        for log in handles:
            log.close()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert out.exists(), output[-3000:]
    history = json.loads(out.with_suffix(".json").read_text())
    return history, out, output


def _check_model(out: Path) -> None:
    state = load_file(str(out))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.weight": (32, 64),
        "0.bias": (32,),
        "2.weight": (10, 32),
        "2.bias": (10,),
    }
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_simulation_engine_four_clients_accuracy_improves(tmp_path):
    # partition 3 sends a NaN every round: left out, named, and the run goes on
    history, out, output = _run_app(
        tmp_path, simulation=True, overrides="num-server-rounds=2 min-nodes=4 nan-partition=3"
    )
    accuracy = [history[str(r)]["accuracy"] for r in range(3)]
    assert accuracy[2] > accuracy[0] + 0.3, accuracy
    assert output.count("aggregate_train: Received 4 results and 0 failures") == 2
    skips = re.findall(r"modelfuse: round (\d): client node (\d+) skipped: (.*)", output)
    assert [r for r, _, _ in skips] == ["1", "2"], output[-3000:]
    assert len({node for _, node, _ in skips}) == 1
    assert {reason.strip() for _, _, reason in skips} == {
        "tensor '0.weight' has 1 NaN or inf values of 2048"
    }
    assert "(2 client replies skipped)" in output
    _check_model(out)


def test_localhost_deployment_superlink_and_two_supernodes(tmp_path):
    # Fisher aggregation: every client's diagonal Fisher travels in its reply
    history, out, output = _run_app(
        tmp_path,
        simulation=False,
        overrides="num-server-rounds=1 min-nodes=2 modelfuse-method='fisher'",
    )
    accuracy = [history[str(r)]["accuracy"] for r in range(2)]
    assert accuracy[1] > accuracy[0] + 0.2, accuracy
    assert "aggregate_train: Received 2 results and 0 failures" in output
    assert "modelfuse aggregation: fisher" in output
    assert "(0 client replies skipped)" in output
    _check_model(out)
