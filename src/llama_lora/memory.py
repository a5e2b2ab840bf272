"""Memory: the measured peak of this process (RSS on CPU), resettable on Linux so that a step's own peak can be read."""

from __future__ import annotations

import resource
from pathlib import Path

GIB = 2**30
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the process started or since ``reset_peak_rss``."""
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux: getrusage's maximum (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False elsewhere."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
