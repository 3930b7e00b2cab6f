"""The first command of the README: `make run` on a fresh data directory, as a new user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, echoscu, free_port, wait_for_port
from tests.worklist.hl7_messages import msa, orm
from worklist.hl7.mllp import send

pytestmark = pytest.mark.slow


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries `marker` (our data dir): everything make run started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_make_run_serves_echo_and_healthz_then_stops_cleanly(tmp_path):
    data_dir = str(tmp_path / "isthmus-data")
    dimse_port, http_port, hl7_port = free_port(), free_port(), free_port()
    prefixes = ("DATABASE_URL", "CELERY_", "PROMETHEUS_", "DJANGO_", "ISTHMUS_")  # a new user's defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(ISTHMUS_DATA_DIR=data_dir, ISTHMUS_DIMSE_PORT=str(dimse_port), ISTHMUS_HTTP_PORT=str(http_port), ISTHMUS_HL7_PORT=str(hl7_port),
               ISTHMUS_HTTP_HOST="127.0.0.1", ISTHMUS_DIMSE_HOST="127.0.0.1", ISTHMUS_HL7_HOST="127.0.0.1", ISTHMUS_MIN_FREE_MB="1")  # fmt: skip
    log = open(tmp_path / "run.log", "w+")
    started = time.monotonic()
    gateway = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        status, report = None, None
        while time.monotonic() - started < 30 and status != 200:
            assert gateway.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                response = requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=10)
                status, report = response.status_code, response.json()
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.25)
        assert status == 200, (report, Path(log.name).read_text()[-3000:])

        # HL7 is refused until its sender is registered (ISTHMUS_REQUIRE_KNOWN_HL7_SENDER defaults to true).
        wait_for_port(hl7_port, timeout=30)
        order = orm("MR1", "NW", "ACC1")
        assert msa(send("127.0.0.1", hl7_port, [order], timeout=30)[0].decode())[1] == "AR"

        # A new user registers the modality and the RIS from a file, then the modality echoes and the RIS orders.
        config = tmp_path / "nodes.yaml"
        config.write_text("nodes:\n  - {name: ct-1, ae_title: CT1, host: 127.0.0.1, port: 104}\n"
                          "hl7_senders:\n  - {name: ris, host: 127.0.0.1}\n")  # fmt: skip
        imported = subprocess.run([str(ROOT / ".venv/bin/python"), "manage.py", "import_config", str(config)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert imported.returncode == 0 and "applied: 2 added" in imported.stdout, imported.stderr
        echoed = echoscu(dimse_port, "CT1")
        assert echoed.returncode == 0, echoed.stdout + echoed.stderr
        assert msa(send("127.0.0.1", hl7_port, [order], timeout=30)[0].decode())[1] == "AA"
        assert time.monotonic() - started < 30 + 30  # healthz was up within 30 s; import and echo are quick
        assert processes_with(data_dir), "make run's processes carry the data dir in their environment"
    finally:
        os.killpg(gateway.pid, signal.SIGINT)  # Ctrl-C in the terminal
        deadline = time.monotonic() + 60
        while processes_with(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_with(data_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes left behind: {left}"
    assert "all Isthmus processes stopped" in Path(log.name).read_text()
