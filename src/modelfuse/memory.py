"""The peak memory of this process, as merge summaries and benchmarks report it."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had, in bytes.

    Read from ``VmHWM`` in ``/proc/self/status`` where it exists (Linux): it
    belongs to this program alone. ``getrusage``'s ``ru_maxrss``, the fall-back
    elsewhere, is carried over from the parent across ``fork`` and ``exec`` on
    Linux, so a command started by a large process (a notebook, a benchmark
    that has just generated its checkpoints) would report the parent's peak.

    Examples
    --------
    >>> peak_rss_bytes() > 0
    True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024
