"""Helpers shared by the benchmarks (run as `python bench/NAME.py`): loopback ports, Orthanc, Isthmus's environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until something listens on `port`; fails early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


ORTHANC = "/usr/sbin/Orthanc"


def start_orthanc(base: Path, config: dict, http_port: int, dicom_port: int) -> subprocess.Popen:
    """Debian's Orthanc with `config` written to base/orthanc.json, logging to base/orthanc.log; once it listens."""
    (base / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(base / "orthanc.log", "ab")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(
        [ORTHANC, str(base / "orthanc.json")],
        env={**os.environ, "TCP_NODELAY": "1"},
        cwd=base,
        stdout=log,
        stderr=log,
    )
    wait_for_port(http_port, process)
    wait_for_port(dicom_port, process)
    return process


def isthmus_env(base: Path, **settings: str) -> dict[str, str]:
    """The environment of an Isthmus process of a benchmark: its own data dir, none of the caller's database."""
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(
        ISTHMUS_DATA_DIR=str(base), ISTHMUS_LOG_LEVEL="warning", ISTHMUS_MIN_FREE_MB="0", TCP_NODELAY="1", **settings
    )
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (gunicorn's workers, Orthanc's threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, family = 0.0, {pid}
    for child, (parent, _seconds) in sorted(stats.items()):
        if parent in family:
            family.add(child)
    for member in family:
        total += stats.get(member, (0, 0.0))[1]
    return total
