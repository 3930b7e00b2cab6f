"""Routing fixtures: Orthanc peers, destinations and rules, and a way to run due deliveries in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.utils import timezone

from gateway.celery import app as celery_app
from gateway.models import Node
from routing import outbox, services
from routing.models import Destination, ForwardJob, Rule
from tests.conftest import REDIS_URL
from tests.orthanc import Orthanc


@pytest.fixture
def storage(settings, tmp_path) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


class Doorbells:
    """The delivery messages the outbox sent, read back from the real broker (no worker consumes them here)."""

    TASK = "routing.tasks.deliver"

    def __init__(self) -> None:
        self._rung: list[tuple[int, str]] = []

    def _queue(self, connection):
        return connection.SimpleQueue(celery_app.conf.task_default_queue)

    def rung(self, wait: float = 0.0) -> list[tuple[int, str]]:
        """(destination id, study UID) of every deliver message so far, oldest first."""
        deadline = time.monotonic() + wait
        with celery_app.connection_for_read() as connection:
            queue = self._queue(connection)
            try:
                while True:
                    try:
                        message = queue.get(block=False)
                    except queue.Empty:
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(0.05)
                        continue
                    message.ack()
                    if message.headers.get("task") == self.TASK:
                        args = message.payload[0]
                        self._rung.append((args[0], args[1]))
            finally:
                queue.close()
        return list(self._rung)

    def clear(self) -> None:
        self.rung()
        self._rung.clear()


@pytest.fixture
def rings(settings, transactional_db) -> Iterator[Doorbells]:
    """Doorbells as sent to the broker (every one: no debounce window); tests drive deliveries with drain()."""
    settings.ROUTING_RING_WINDOW_SECONDS = 0.0
    doorbells = Doorbells()
    doorbells.clear()  # messages left by earlier tests
    outbox.invalidate()
    yield doorbells
    outbox.invalidate()


@pytest.fixture
def redis_broker() -> Iterator[redis.Redis]:
    """This process publishes to the test's own Redis db (emptied before and after: FLUSHDB, never FLUSHALL)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    saved = celery_app.conf.broker_url, celery_app.conf.broker_transport_options
    celery_app.conf.broker_url, celery_app.conf.broker_transport_options = REDIS_URL, {}
    celery_app._pool, celery_app.amqp._producer_pool = None, None
    yield client
    celery_app.conf.broker_url, celery_app.conf.broker_transport_options = saved
    celery_app._pool, celery_app.amqp._producer_pool = None, None
    client.flushdb()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """A running Orthanc with DICOMweb, shared by a module's tests (each test uses its own UIDs)."""
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"), ae_title="ORTHANC")
    peer.start()
    yield peer
    peer.close()


def dimse_destination(peer: Orthanc, name: str = "pacs", **fields) -> Destination:
    node = Node.objects.create(
        name=f"{name}-node", ae_title=peer.ae_title, host="127.0.0.1", port=peer.dicom_port, allowed_in=False
    )
    fields.setdefault("retry_first_delay", 0.2)
    fields.setdefault("retry_max_delay", 1.0)
    return Destination.objects.create(name=name, kind=Destination.Kind.DIMSE, node=node, **fields)


def stow_destination(url: str, name: str = "cloud", **fields) -> Destination:
    fields.setdefault("retry_first_delay", 0.2)
    fields.setdefault("retry_max_delay", 1.0)
    fields.setdefault("read_timeout", 30.0)
    return Destination.objects.create(name=name, kind=Destination.Kind.DICOMWEB, url=url, **fields)


def rule(name: str, conditions: dict, *destinations: Destination, **fields) -> Rule:
    created = Rule.objects.create(name=name, conditions=conditions, **fields)
    created.destinations.set(destinations)
    outbox.invalidate()
    return created


def drain(timeout: float = 30.0) -> int:
    """Deliver every due job in this process, waiting out backoffs, until none is pending; returns deliveries run."""
    runs, deadline = 0, time.monotonic() + timeout
    pending = ForwardJob.objects.filter(state=ForwardJob.State.PENDING)
    while pending.exists() and time.monotonic() < deadline:
        pairs = set(
            pending.filter(next_attempt_at__lte=timezone.now()).values_list("destination_id", "study_instance_uid")
        )
        if not pairs:
            time.sleep(0.05)
            continue
        for destination_id, study_uid in pairs:
            services.deliver(destination_id, study_uid)
            runs += 1
    return runs


def states() -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in ForwardJob.objects.values_list("state", flat=True):
        counts[state] = counts.get(state, 0) + 1
    return counts
