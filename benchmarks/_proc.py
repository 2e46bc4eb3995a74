"""Process memory from /proc, for benchmark children that measure their own peak (no heavy imports:
importing this must not move the numbers it reads)."""

from __future__ import annotations


def status_kb(key: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status in kB (VmRSS: resident now, VmHWM: peak resident), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
