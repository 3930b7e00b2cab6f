"""The whole gateway as `make run` starts it (`manage.py run`), in a subprocess with its own data dir and ports.

Its stdout and stderr are kept in separate files, every byte, so a test can read what an
administrator's terminal or journal would hold.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import ROOT, free_port

# A new user's defaults: none of the test run's settings leak into the gateway.
CLEARED_PREFIXES = ("DATABASE_URL", "CELERY_", "PROMETHEUS_", "DJANGO_", "ISTHMUS_")


class RunningGateway:
    """`manage.py run` on loopback with a fresh data directory; stop() is idempotent."""

    def __init__(self, workdir: Path, **settings: str) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "isthmus-data"
        self.dimse_port, self.http_port, self.hl7_port = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES)}
        self.env.update(
            ISTHMUS_DATA_DIR=str(self.data_dir),
            ISTHMUS_DIMSE_PORT=str(self.dimse_port),
            ISTHMUS_HTTP_PORT=str(self.http_port),
            ISTHMUS_HL7_PORT=str(self.hl7_port),
            ISTHMUS_HTTP_HOST="127.0.0.1",
            ISTHMUS_DIMSE_HOST="127.0.0.1",
            ISTHMUS_HL7_HOST="127.0.0.1",
            ISTHMUS_MIN_FREE_MB="1",
            ISTHMUS_DIMSE_PROCESSES="1",
            ISTHMUS_WEB_WORKERS="1",
            ISTHMUS_WORKER_CONCURRENCY="1",
            PYTHONUNBUFFERED="1",
            **settings,
        )
        self.stdout_path, self.stderr_path = workdir / "run.stdout", workdir / "run.stderr"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 40.0) -> RunningGateway:
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "run"], cwd=ROOT, env=self.env,
                stdout=stdout, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"manage.py run exited {self.process.returncode}: {self.output()[-3000:]!r}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"/healthz not 200 after {timeout} s: {self.output()[-3000:]!r}")

    def manage(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Another `manage.py` command against this gateway's data directory and database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, input=stdin,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def output(self) -> bytes:
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def stop(self) -> None:
        """Ctrl-C, as in the terminal; wait for every process; SIGKILL the group if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
