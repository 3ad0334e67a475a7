"""Peak resident memory of this process above a baseline (Linux /proc)."""

from __future__ import annotations

from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    return _status("VmRSS")


def reset_peak() -> int:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; returns that baseline."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_bytes()


def peak_bytes() -> int:
    return _status("VmHWM")
