"""Real Celery workers for the routing tests, each in its own process group so kill -9 takes its pool too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REDIS_URL, ROOT, peer_env


class Worker:
    """`celery worker` (with beat unless told otherwise) consuming the test's Redis db, sharing its database."""

    def __init__(self, folder: Path, storage: Path, *, beat: bool = True, **env: str) -> None:
        self.folder, self.storage, self.beat = folder, storage, beat
        self.env = {"ISTHMUS_ROUTING_SWEEP_SECONDS": "1", "ISTHMUS_ROUTING_LEASE_SECONDS": "4", **env}
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "gateway", "worker", "--concurrency", "2"]
        command += ["--hostname", f"routing-{time.monotonic_ns()}@%h", "--loglevel", "INFO"]
        if self.beat:
            # A fresh beat schedule per start: a killed beat may leave its shelve file half-written.
            command += ["-B", "--schedule", str(self.folder / f"beat-schedule-{time.monotonic_ns()}")]
        env = peer_env(CELERY_BROKER_URL=REDIS_URL, ISTHMUS_STORAGE_DIR=str(self.storage), **self.env)
        with open(self.folder / "worker.log", "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL the whole group: no clean shutdown, no acks, leases left behind; returns once all have exited."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            wait_until(lambda: not _live_members(self.process.pid), 10, step=0.02)  # the pool's sockets closed
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


def _live_members(group: int) -> list[int]:
    """Processes of a process group that have not exited (zombies have: their sockets are closed)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_until(condition, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()
