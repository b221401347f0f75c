import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_setting_applies_in_a_fresh_process():
    # In a child process: the setting is process-wide and must not leak into the test run.
    code = "from modelfuse.cli._memory import return_freed_memory_promptly as f; print(f())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
