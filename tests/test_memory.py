"""The peak memory reported is this process's own, not its parent's."""

from __future__ import annotations

import subprocess
import sys

from modelfuse.memory import peak_rss_bytes


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    # The parent holds 1 GB when it starts the child; the child itself holds
    # far less. getrusage's ru_maxrss would report the parent's 1 GB.
    script = (
        "import subprocess, sys\n"
        "block = bytearray(1_000_000_000)\n"
        "block[::4096] = b'x' * len(block[::4096])\n"
        "child = 'from modelfuse.memory import peak_rss_bytes; print(peak_rss_bytes())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True,"
        " check=True).stdout)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    child_peak = int(done.stdout.split()[0])
    assert 0 < child_peak < 700_000_000


def test_the_peak_grows_with_what_this_process_touches() -> None:
    before = peak_rss_bytes()
    block = bytearray(64_000_000)
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_bytes() >= before
    assert peak_rss_bytes() >= 64_000_000
    del block
