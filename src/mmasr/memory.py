"""Process memory as the kernel reports it (``/proc/<pid>/status`` on Linux), without importing torch: the
preprocess workers and the benchmarks that watch other processes read it too."""
from __future__ import annotations

import resource
import sys

__all__ = ["proc_status_bytes", "peak_rss_bytes"]


def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A kB field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ...) in bytes;
    None where there is no such file (not Linux, or the process has ended) or no such field."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """A process's peak resident memory so far. On Linux ``VmHWM``: ``ru_maxrss`` survives ``exec``, so a
    process started by a large one (Snakemake, a benchmark that built the models) would report its parent's
    peak. Elsewhere, for this process only, ``ru_maxrss`` (bytes on macOS, kB on the others); None for
    another process there."""
    peak = proc_status_bytes("VmHWM", pid)
    if peak is not None or pid != "self":
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)
