"""Association control over the wire: dcmtk echoscu against our listener."""

from __future__ import annotations

import socket
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.models import AssociationEvent, Node
from tests.conftest import echoscu

Reason = AssociationEvent.Reason


def last_event() -> AssociationEvent:
    return AssociationEvent.objects.order_by("-at", "-pk").first()


def test_registered_node_echo_succeeds_and_is_seen(listener, modality):
    result = echoscu(listener.port, "CT1")
    assert result.returncode == 0, result.stderr
    event = last_event()
    assert (event.accepted, event.reason, event.calling_ae, event.node) == (True, Reason.ACCEPTED, "CT1", modality)
    assert event.peer_address == "127.0.0.1"
    modality.refresh_from_db()
    assert modality.last_seen_address == "127.0.0.1" and modality.last_seen_at is not None


def test_association_end_is_recorded_with_request_count(listener, modality):
    echoscu(listener.port, "CT1")
    event = last_event()
    for _ in range(100):  # the close is recorded by the listener's DUL thread, just after echoscu exits
        event.refresh_from_db()
        if event.ended_at:
            break
        time.sleep(0.05)
    assert (event.outcome, event.requests) == ("released", 1)


def test_unknown_calling_ae_is_rejected(listener, modality):
    result = echoscu(listener.port, "STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    event = last_event()
    assert (event.accepted, event.reason, event.calling_ae, event.outcome) == (
        False,
        Reason.CALLING_AE,
        "STRANGER",
        "rejected",
    )


def test_wrong_called_ae_is_rejected(listener, modality):
    result = echoscu(listener.port, "CT1", called="NOTUS")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    event = last_event()
    assert (event.accepted, event.reason, event.called_ae) == (False, Reason.CALLED_AE, "NOTUS")


def test_known_ae_from_another_host_is_rejected(listener, transactional_db):
    Node.objects.create(name="mr-1", ae_title="MR1", host="127.0.0.2", port=104)
    result = echoscu(listener.port, "MR1")  # echoscu connects from 127.0.0.1
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    event = last_event()
    assert (event.accepted, event.reason, event.peer_address) == (False, Reason.HOST_MISMATCH, "127.0.0.1")
    assert "127.0.0.2" in event.detail


def test_host_given_as_name_is_resolved(listener, transactional_db):
    Node.objects.create(name="us-1", ae_title="US1", host="localhost", port=104)
    assert echoscu(listener.port, "US1").returncode == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"enabled": False}, Reason.DISABLED), ({"allowed_in": False}, Reason.NOT_ALLOWED_IN)],
)
def test_disabled_or_outbound_only_node_is_rejected(listener, modality, change, reason):
    Node.objects.filter(pk=modality.pk).update(**change)
    assert echoscu(listener.port, "CT1").returncode != 0
    assert last_event().reason == reason


def test_node_without_echo_permission_gets_refused_status(listener, modality):
    Node.objects.filter(pk=modality.pk).update(allow_echo=False)
    scu = AE(ae_title="CT1")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", listener.port, ae_title="ISTHMUS")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0124  # PS3.7 C.5.4 Refused: Not Authorized


def test_unknown_ae_accepted_when_not_required(listener, transactional_db, settings):
    settings.REQUIRE_KNOWN_AE = False
    assert echoscu(listener.port, "ANYONE").returncode == 0
    event = last_event()
    assert event.accepted and event.node is None


def test_listener_sets_tcp_nodelay(listener, modality):
    seen: list[int] = []

    def spy(event):
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    listener.server.bind(evt.EVT_DIMSE_RECV, spy)
    assert echoscu(listener.port, "CT1").returncode == 0
    assert seen and all(seen)


def test_association_over_the_limit_is_rejected_transient_and_recorded(listener, modality, settings):
    settings.DIMSE_MAX_ASSOCIATIONS = listener.ae.maximum_associations = 1
    scu = AE(ae_title="CT1")
    scu.add_requested_context(Verification)
    first = scu.associate("127.0.0.1", listener.port, ae_title="ISTHMUS")
    assert first.is_established
    try:
        result = echoscu(listener.port, "CT1")
        assert result.returncode != 0
        assert "Rejected Transient" in result.stdout + result.stderr
        event = last_event()
        assert (event.accepted, event.reason) == (False, Reason.BUSY)
    finally:
        first.release()
