"""Per-instance C-STORE statuses, claims and leases, pacing, and the operators' actions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from gateway import store
from routing import outbox, services
from routing.models import DeliveryAttempt, Destination, ForwardJob
from routing.ratelimit import Pacer
from tests.conftest import free_port
from tests.gateway.instances import make_instance, sop_uid_of
from tests.routing.conftest import drain, rule, states, stow_destination
from tests.routing.test_stow_failures import receive


class StoreScp:
    """A pynetdicom C-STORE SCP answering each SOP Instance UID with the status the test sets."""

    def __init__(self, transfer_syntaxes: list[str] | None = None) -> None:
        self.port = free_port()
        self.statuses: dict[str, int] = {}
        self.received: list[str] = []
        self.syntaxes: list[str] = []
        ae = AE(ae_title="PICKY")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, transfer_syntaxes or context.transfer_syntax)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        self.received.append(uid)
        self.syntaxes.append(event.context.transfer_syntax)
        return self.statuses.get(uid, 0x0000)


@pytest.fixture
def picky() -> Iterator[StoreScp]:
    scp = StoreScp()
    yield scp
    scp.server.shutdown()


def picky_destination(scp: StoreScp, **fields) -> Destination:
    from gateway.models import Node

    node = Node.objects.create(name="picky", ae_title="PICKY", host="127.0.0.1", port=scp.port)
    fields.setdefault("retry_first_delay", 0.2)
    fields.setdefault("retry_max_delay", 0.5)
    return Destination.objects.create(name="picky", kind=Destination.Kind.DIMSE, node=node, **fields)


def test_c_store_statuses_per_instance(storage, rings, picky, tmp_path):
    rule("all", {}, picky_destination(picky))
    uids = receive(tmp_path / "in", count=5)
    picky.statuses = {uids[0]: 0xA900, uids[1]: 0xA700, uids[2]: 0xB007, uids[3]: 0x0111}

    services.deliver(ForwardJob.objects.first().destination_id, ForwardJob.objects.first().study_instance_uid)

    by_uid = {job.instance.sop_instance_uid: job for job in ForwardJob.objects.select_related("instance")}
    assert by_uid[uids[0]].state == "dead" and "0xA900" in by_uid[uids[0]].last_error  # permanent
    assert by_uid[uids[1]].state == "pending" and by_uid[uids[1]].next_attempt_at > timezone.now()  # transient
    assert {by_uid[uid].state for uid in uids[2:]} == {"delivered"}  # warning, duplicate, success
    assert picky.received == uids  # one association, every instance once

    picky.statuses = {}
    drain()
    assert states() == {"delivered": 4, "dead": 1}
    assert picky.received.count(uids[1]) == 2 and picky.received.count(uids[0]) == 1


def test_a_claimed_batch_is_leased_and_concurrency_is_capped(storage, rings, tmp_path):
    destination = stow_destination("http://127.0.0.1:9/dicom-web", batch_size=2, max_concurrency=1)
    rule("all", {}, destination)
    study = generate_uid()
    receive(tmp_path / "in", study, count=3)

    claim = services.claim_batch(destination.pk, study)
    assert len(claim.items) == 2 and services.active_batches(destination.pk) == 1
    assert services.claim_batch(destination.pk, study) is None  # max_concurrency 1: the next waits
    destination.max_concurrency = 2
    destination.save()
    second = services.claim_batch(destination.pk, study)
    assert [item.job_id for item in second.items] == [ForwardJob.objects.order_by("pk").last().pk]
    assert services.claim_batch(destination.pk, study) is None  # nothing left unheld
    # The first worker died: once its lease runs out, the sweep rings and the jobs are claimable again.
    ForwardJob.objects.filter(batch=claim.token).update(lease_until=timezone.now() - timedelta(seconds=1))
    rings.clear()
    assert services.sweep() == 1 and rings.rung() == [(destination.pk, study)]
    assert len(services.claim_batch(destination.pk, study).items) == 2


def test_pause_cancel_retry(storage, rings, tmp_path):
    destination = stow_destination("http://127.0.0.1:9/dicom-web")
    rule("all", {}, destination)
    study = generate_uid()
    receive(tmp_path / "in", study, count=3)
    jobs = list(ForwardJob.objects.order_by("pk").values_list("pk", flat=True))

    services.set_paused(destination, True)
    assert services.deliver(destination.pk, study) == 0 and states() == {"pending": 3}
    assert services.sweep() == 0  # paused destinations are not rung
    assert services.cancel_jobs(jobs[:1]) == 1
    ForwardJob.objects.filter(pk=jobs[1]).update(state="dead", attempts=20, last_error="x")
    assert services.retry_jobs(ForwardJob.objects.filter(pk=jobs[1])) == 1
    assert states() == {"cancelled": 1, "pending": 2}
    assert ForwardJob.objects.get(pk=jobs[1]).attempts == 0
    rings.clear()
    services.set_paused(destination, False)
    assert rings.rung() == [(destination.pk, study)]


def test_doorbells_are_debounced_with_a_trailing_ring(rings, settings):
    settings.ROUTING_RING_WINDOW_SECONDS = 0.2
    study = generate_uid()
    for _ in range(50):
        outbox.ring(1, study)
    assert rings.rung() == [(1, study)]
    # one more after the burst, so the last instance is not left to the sweep
    assert rings.rung(wait=1.0) == [(1, study)] * 2


def test_pacer_holds_both_limits():
    now = [0.0]
    pacer = Pacer(
        instances_per_second=10,
        mbytes_per_second=1,
        share=2,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    for size in (100_000, 100_000, 400_000, 10):
        pacer.wait(size)
    # share 2: 5 instances/s and 0.5 MB/s; the third waits for bytes (0.4 s), the fourth for bytes too (1.2 s)
    assert now[0] == pytest.approx(1.2)
    pacer.finish()
    assert now[0] == pytest.approx(600_010 / 500_000)


def test_delivery_attempts_are_recorded(storage, rings, picky, tmp_path):
    rule("all", {}, picky_destination(picky))
    receive(tmp_path / "in", count=2)
    drain()
    assert DeliveryAttempt.objects.filter(outcome="delivered").count() == 2


def test_peer_refusing_the_stored_syntax_gets_implicit_little_endian(storage, rings, tmp_path):
    scp = StoreScp([ImplicitVRLittleEndian])
    try:
        rule("all", {}, picky_destination(scp))
        uids = receive(tmp_path / "in", count=2)  # stored as explicit VR little endian
        rle = make_instance("SC_rgb_rle.dcm", tmp_path / "rle", study_uid=ForwardJob.objects.first().study_instance_uid)
        with open(rle, "rb") as stream:
            assert store.save(source=stream).ok

        drain()
    finally:
        scp.server.shutdown()
    assert scp.received == uids and scp.syntaxes == [ImplicitVRLittleEndian] * 2  # re-encoded, not refused
    dead = ForwardJob.objects.get(state="dead")  # RLE cannot be re-encoded without decompressing: no retry helps
    assert dead.instance.sop_instance_uid == sop_uid_of(rle)
    assert "accepted no context" in dead.last_error
