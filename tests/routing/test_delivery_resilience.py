"""Nothing is lost: a destination down for 30 s, Redis flushed and the worker killed mid-batch.

A real Celery worker (with beat) consumes the test's own Redis db; our
listener receives from dcmtk storescu and rings that worker on commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydicom.uid import generate_uid

from gateway.celery import app
from routing.models import DeliveryAttempt, ForwardJob
from tests.conftest import REDIS_URL, ROOT, peer_env
from tests.gateway.instances import make_instance, sop_uid_of, storescu
from tests.orthanc import Orthanc
from tests.routing.conftest import dimse_destination, rule, states

COUNT = 200


@pytest.fixture
def redis_broker() -> Iterator[redis.Redis]:
    """This process publishes to the test's own Redis db (emptied before and after: FLUSHDB, never FLUSHALL)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    saved = app.conf.broker_url, app.conf.broker_transport_options
    app.conf.broker_url, app.conf.broker_transport_options = REDIS_URL, {}
    app._pool, app.amqp._producer_pool = None, None
    yield client
    app.conf.broker_url, app.conf.broker_transport_options = saved
    app._pool, app.amqp._producer_pool = None, None
    client.flushdb()


class Worker:
    """`celery worker -B` in its own process group, so kill -9 takes the pool children and beat too."""

    def __init__(self, folder: Path, storage: Path) -> None:
        self.folder, self.storage = folder, storage
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "gateway", "worker", "-B", "--concurrency", "2"]
        command += ["--hostname", f"routing-{time.monotonic_ns()}@%h", "--loglevel", "INFO"]
        # A fresh beat schedule per start: a killed beat may leave its shelve file half-written.
        command += ["--schedule", str(self.folder / f"beat-schedule-{time.monotonic_ns()}")]
        env = peer_env(
            CELERY_BROKER_URL=REDIS_URL,
            ISTHMUS_STORAGE_DIR=str(self.storage),
            ISTHMUS_ROUTING_SWEEP_SECONDS="1",
            ISTHMUS_ROUTING_LEASE_SECONDS="4",
        )
        with open(self.folder / "worker.log", "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL the whole group: no clean shutdown, no acks, leases left behind."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


@pytest.fixture
def worker(tmp_path, storage) -> Iterator[Worker]:
    celery = Worker(tmp_path / "worker", storage)
    yield celery
    celery.kill()


@pytest.fixture
def pacs(tmp_path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc")
    yield peer
    peer.close()


def study(folder: Path) -> list[Path]:
    study_uid, series_uid = generate_uid(), generate_uid()
    return [make_instance("CT_small.dcm", folder, study_uid=study_uid, series_uid=series_uid) for _ in range(COUNT)]


def wait_until(condition, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def assert_all_arrived_once(pacs: Orthanc, files: list[Path]) -> None:
    assert wait_until(lambda: states() == {"delivered": COUNT}, 40), states()
    in_orthanc = pacs.instances()
    assert sorted(in_orthanc) == sorted(sop_uid_of(path) for path in files)  # every one, none twice
    assert pacs.statistics()["CountInstances"] == COUNT


def test_destination_down_for_30_seconds_loses_nothing(modality, listener, redis_broker, worker, pacs, tmp_path):
    destination = dimse_destination(
        pacs, retry_first_delay=1.0, retry_multiplier=2.0, retry_max_delay=4.0, retry_attempts=100, batch_size=50
    )
    rule("all", {}, destination)
    worker.start()
    files = study(tmp_path / "in")

    down_since = time.monotonic()
    assert storescu(listener.port, files).returncode == 0  # Orthanc is not running
    assert ForwardJob.objects.count() == COUNT
    assert wait_until(lambda: DeliveryAttempt.objects.filter(outcome="retry").exists(), 20)
    time.sleep(max(0.0, down_since + 30 - time.monotonic()))
    assert states() == {"pending": COUNT}
    pacs.start()

    assert_all_arrived_once(pacs, files)
    assert not DeliveryAttempt.objects.filter(outcome="dead").exists()
    assert DeliveryAttempt.objects.filter(outcome="delivered").count() == COUNT
    assert ForwardJob.objects.filter(attempts__gt=1).count() == COUNT  # each was retried, none went dead


def test_redis_flushed_and_worker_killed_mid_batch_loses_nothing(
    modality, listener, redis_broker, worker, pacs, tmp_path
):
    pacs.start()
    # Paced (2 x 25 instances/s) so that the kill lands mid-batch.
    destination = dimse_destination(pacs, rate_instances=50.0, batch_size=40, max_concurrency=2)
    rule("all", {}, destination)
    worker.start()
    files = study(tmp_path / "in")

    assert storescu(listener.port, files).returncode == 0
    assert wait_until(lambda: len(pacs.instances()) >= 30, 30)
    redis_broker.flushdb()  # every queued doorbell and unacknowledged message is gone
    worker.kill()
    arrived = len(pacs.instances())
    assert 30 <= arrived < COUNT
    assert ForwardJob.objects.filter(state="pending").exclude(batch="").exists()  # leases left by the dead worker

    worker.start()

    assert_all_arrived_once(pacs, files)
    assert not DeliveryAttempt.objects.filter(outcome="dead").exists()
