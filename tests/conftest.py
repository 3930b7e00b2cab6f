"""Fixtures that start real peers on free loopback ports: our listener, dcmtk, Django processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.cache import caches
from django.db import connection

from gateway.dimse.server import Listener
from gateway.models import Node

ROOT = Path(__file__).resolve().parent.parent
DCMTK_BIN = Path("/usr/bin")  # a venv may shadow echoscu with pynetdicom's script


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(f"dcmtk's {tool} is missing: install the dcmtk Debian package (.ci/run does)")
    return str(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def peer_env(**overrides: str) -> dict[str, str]:
    """Environment for a dcmtk tool or a child Isthmus process, sharing the test database."""
    env = {**os.environ, "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"}
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    env.update(overrides)
    return env


def spawn_python(*args: str, **env_overrides: str) -> subprocess.Popen:
    """Start `python ARGS` from the project root with the test database; output discarded."""
    return subprocess.Popen(
        [sys.executable, *args],
        env=peer_env(**env_overrides),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(autouse=True)
def fresh_rate_limits() -> None:
    """Per-source counts (gateway/ratelimit.py) live in a cache shared by the whole run: one test's
    failures from 127.0.0.1 must not block the next test's requests."""
    caches["ratelimit"].clear()


@pytest.fixture
def listener(transactional_db) -> Iterator[Listener]:
    """Our DIMSE listener on a free loopback port, serving from this test's database."""
    dimse = Listener("127.0.0.1", 0)
    dimse.start()
    yield dimse
    dimse.stop(grace=5)


@pytest.fixture
def storescp(tmp_path) -> Iterator[dict]:
    """dcmtk storescp, a real third-party SCP, as a remote node to verify."""
    port = free_port()
    process = subprocess.Popen(
        [dcmtk("storescp"), "--aetitle", "STORESCP", "--output-directory", str(tmp_path), str(port)],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    yield {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}
    stop_process(process)


@pytest.fixture
def modality(transactional_db) -> Node:
    """A registered CT modality that may associate from loopback."""
    return Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", port=104)


@pytest.fixture
def web_with(transactional_db):
    """Start the real web server (gunicorn) with some settings overridden; yields its base URL."""
    processes = []

    def start(**env_overrides: str) -> str:
        port = free_port()
        gunicorn = (
            "-m",
            "gunicorn",
            "gateway.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--no-control-socket",
        )
        process = spawn_python(*gunicorn, **env_overrides)
        processes.append(process)
        wait_for_port(port, process=process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        stop_process(process)


def echoscu(port: int, calling: str, called: str = "ISTHMUS", host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, "-to", "10", host, str(port)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def manage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env or peer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# The Redis the tests use for real (CI sets it; the machine runs one on 6379).
REDIS_URL = os.environ.get("ISTHMUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
