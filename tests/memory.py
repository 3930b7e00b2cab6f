"""Memory of a process under test, from /proc: its peak resident set since a reset (Linux's clear_refs)."""

from __future__ import annotations

import time
from pathlib import Path

MB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakGrowth:
    """How far a process's resident set rose above where it was when this was made (its peak, not its end)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # proc(5): reset the peak (VmHWM) to the current RSS
        self.start = _status(pid)["VmRSS"]

    def bytes(self) -> int:
        return _status(self.pid)["VmHWM"] - self.start


def child_pid(parent: int, timeout: float = 20.0) -> int:
    """The first child of `parent` (gunicorn's worker), waiting for it to be forked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise TimeoutError(f"process {parent} has no child after {timeout} s")
