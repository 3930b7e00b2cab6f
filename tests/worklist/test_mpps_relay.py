"""MPPS relay: every MPPS is owed to the relay nodes in an outbox row, kept while the node is down, delivered in order."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from gateway.models import Node
from tests.conftest import free_port
from tests.worklist import factories
from tests.worklist.test_mpps import create, final, in_progress, mpps_association, update
from worklist import relay, tasks
from worklist.models import MppsRelay


class DownstreamMpps:
    """A pynetdicom MPPS SCP standing for the RIS; records what it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str, str]] = []
        self.server = None

    def start(self) -> None:
        ae = AE(ae_title="RISMPPS")
        ae.add_supported_context(ModalityPerformedProcedureStep)
        handlers = [(evt.EVT_N_CREATE, self._create), (evt.EVT_N_SET, self._set)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _create(self, event):
        attributes = event.attribute_list
        self.received.append(("create", event.request.AffectedSOPInstanceUID, str(attributes.PatientName)))
        return 0x0000, attributes

    def _set(self, event):
        modifications = event.attribute_list
        self.received.append(("set", event.request.RequestedSOPInstanceUID, modifications.PerformedProcedureStepStatus))
        return 0x0000, modifications


@pytest.fixture
def downstream(listener, settings) -> Iterator[DownstreamMpps]:
    """A registered relay node, not started: the test decides when it is up."""
    port = free_port()
    Node.objects.create(name="ris-mpps", ae_title="RISMPPS", host="127.0.0.1", port=port)
    settings.MPPS_RELAY_NODES = ["ris-mpps"]
    peer = DownstreamMpps(port)
    yield peer
    peer.stop()


def make_due() -> None:
    """Let the backoff time pass."""
    MppsRelay.objects.filter(state=MppsRelay.State.PENDING).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )


def test_relay_waits_while_the_node_is_down_and_delivers_in_order_once_up(listener, modality, downstream):
    step = factories.scheduled(patient_fields=dict(patient_name="MÜLLER^ANNA"), start_date="20240301")
    uid = generate_uid()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(step), uid)[0] == 0x0000

    row = MppsRelay.objects.get()
    assert (row.operation, row.state, row.destination.name) == ("create", "pending", "ris-mpps")
    assert row.attributes["00100010"]["Value"] == [{"Alphabetic": "MÜLLER^ANNA"}]

    # Down: the attempt fails, the row stays pending with a later due time and the reason.
    assert tasks.deliver_mpps_relays() == 0
    row.refresh_from_db()
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.next_attempt_at > timezone.now()
    assert "RISMPPS" in row.last_error
    assert "MPPS relay" in Node.objects.get(name="ris-mpps").last_error

    with mpps_association(listener.port) as assoc:
        assert update(assoc, final(), uid)[0] == 0x0000
    set_row = MppsRelay.objects.get(operation="set")
    # The N-SET is due but must not overtake its N-CREATE.
    assert relay.claim_due() == []
    set_row.refresh_from_db()
    assert set_row.attempts == 0

    downstream.start()
    make_due()
    assert tasks.deliver_mpps_relays() == 2
    assert downstream.received == [("create", uid, "MÜLLER^ANNA"), ("set", uid, "COMPLETED")]
    assert set(MppsRelay.objects.values_list("state", flat=True)) == {"sent"}
    assert all(sent_at is not None for sent_at in MppsRelay.objects.values_list("sent_at", flat=True))
    # Delivered rows are not sent again.
    make_due()
    assert tasks.deliver_mpps_relays() == 0
    assert len(downstream.received) == 2


def test_no_relay_rows_without_relay_nodes(listener, modality, settings):
    settings.MPPS_RELAY_NODES = []
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(factories.scheduled()), generate_uid())[0] == 0x0000
    assert MppsRelay.objects.count() == 0


def test_refused_mpps_owes_nothing(listener, modality, downstream):
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(factories.scheduled(), Modality=None), generate_uid())[0] == 0x0121
        assert update(assoc, final(), generate_uid())[0] == 0x0112
    assert MppsRelay.objects.count() == 0


def test_a_claimed_row_is_leased(listener, modality, downstream):
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(factories.scheduled()), generate_uid())[0] == 0x0000
    make_due()
    first = relay.claim_due()
    assert len(first) == 1
    assert relay.claim_due() == []  # a second worker passes the leased row by


def test_backoff_grows_and_is_capped():
    delays = [relay.retry_delay(attempt).total_seconds() for attempt in (1, 2, 3, 30)]
    assert 7.5 <= delays[0] <= 10
    assert 15 <= delays[1] <= 20
    assert 30 <= delays[2] <= 40
    assert delays[3] <= relay.RETRY_CAP_SECONDS
