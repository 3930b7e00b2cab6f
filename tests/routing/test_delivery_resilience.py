"""Nothing is lost: a destination down for 30 s, Redis flushed and the worker killed mid-batch.

A real Celery worker (with beat) consumes the test's own Redis db; our
listener receives from dcmtk storescu and rings that worker on commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from routing.models import DeliveryAttempt, ForwardJob
from tests.gateway.instances import make_instance, sop_uid_of, storescu
from tests.orthanc import Orthanc
from tests.routing.conftest import dimse_destination, rule, states
from tests.routing.workers import Worker, wait_until

COUNT = 200


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
