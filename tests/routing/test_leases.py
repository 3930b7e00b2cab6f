"""A send longer than the lease is not taken over: its lease is renewed while it runs, and only while it is held.

Two real Celery workers share the test's Redis db and database; a STOW-RS
server holds the first request for as long as the test likes, and keeps a
request's instances only when its client is still there for the answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.models import Heartbeat
from routing import services
from routing.leases import renew_lease
from routing.models import DeliveryAttempt, ForwardJob
from tests.conftest import free_port
from tests.routing.conftest import rule, states, stow_destination
from tests.routing.stow_server import StowServer, accept_all
from tests.routing.test_stow_failures import receive
from tests.routing.workers import Worker, wait_until

LEASE = 4.0  # renewed every 1.3 s: slack for a loaded CI machine


def test_a_lease_the_delivery_no_longer_holds_is_never_extended(storage, rings, tmp_path):
    destination = stow_destination(f"http://127.0.0.1:{free_port()}/dicom-web")
    rule("cloud", {}, destination)
    receive(tmp_path / "in", study_uid="1.2.3.4", count=2)
    stalled = services.claim_batch(destination.pk, "1.2.3.4")
    assert renew_lease(stalled.token) == 2  # held: renewed

    ForwardJob.objects.update(lease_until=timezone.now() - timedelta(seconds=1))  # it stalled past its lease
    assert renew_lease(stalled.token) == 0  # run out, even before anyone took the jobs
    newer = services.claim_batch(destination.pk, "1.2.3.4")
    held_until = set(ForwardJob.objects.values_list("lease_until", flat=True))

    assert renew_lease(stalled.token) == 0
    assert set(ForwardJob.objects.values_list("batch", flat=True)) == {newer.token}
    assert set(ForwardJob.objects.values_list("lease_until", flat=True)) == held_until


def test_the_heartbeat_stops_when_the_send_ends(storage, rings, tmp_path, settings):
    settings.ROUTING_LEASE_SECONDS = 2.0
    server = StowServer(free_port(), delay=1.5).start()  # one send of 1.5 s: two heartbeats
    try:
        rule("cloud", {}, stow_destination(server.url))
        receive(tmp_path / "in", study_uid="1.2.3.5", count=1)
        assert services.deliver(ForwardJob.objects.get().destination_id, "1.2.3.5") == 1
    finally:
        server.stop()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("lease-")]
    assert ForwardJob.objects.get().lease_until is None


@pytest.fixture
def held_server() -> Iterator[tuple[StowServer, threading.Event]]:
    """A STOW-RS server that holds its first request until the event is set; later ones are answered at once."""
    release = threading.Event()

    def script(number: int, uids: list[str]):
        if number == 0:
            release.wait(60)
        return accept_all(number, uids)

    server = StowServer(free_port(), script=script).start()
    yield server, release
    release.set()
    server.stop()


def test_two_workers_never_send_in_parallel_and_a_killed_send_arrives_once(
    transactional_db, storage, redis_broker, held_server, tmp_path
):
    server, release = held_server
    rule("cloud", {}, stow_destination(server.url, read_timeout=120.0))
    lease = {"ISTHMUS_ROUTING_LEASE_SECONDS": str(LEASE)}
    first = Worker(tmp_path / "first", storage, beat=False, **lease)
    second = Worker(tmp_path / "second", storage, beat=True, **lease)  # its beat sweeps every second
    try:
        first.start()
        (uid,) = receive(tmp_path / "in", count=1)  # rung on commit: the first worker takes it
        assert wait_until(lambda: len(server.requests) == 1, 60), "the first worker never sent"

        second.start()
        assert wait_until(lambda: Heartbeat.objects.filter(kind="worker").exists(), 60), "the second never started"
        time.sleep(2 * LEASE)  # the send outlasts its lease twice over while the second worker sweeps
        sends = [(round(r.started - server.requests[0].started, 1), r.sop_instance_uids) for r in server.requests]
        assert len(server.requests) == 1, f"sent in parallel (start offsets, instances): {sends}"  # renewed

        first.kill()  # mid-send: the server will find its client gone and keep nothing
        killed_at = time.monotonic()
        release.set()
        assert wait_until(lambda: states() == {"delivered": 1}, 30), states()
    finally:
        first.kill()
        second.kill()

    assert server.requests[0].abandoned and server.requests[1].started > killed_at
    assert server.stored == [uid]  # arrived once
    assert DeliveryAttempt.objects.filter(outcome="delivered").count() == 1
