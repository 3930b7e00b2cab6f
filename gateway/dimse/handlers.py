"""DIMSE event handlers: thin functions that call services and answer.

pynetdicom runs each association in its own thread, so handlers close their
Django database connection when the association ends.
"""

from __future__ import annotations

import logging

from django.db import close_old_connections, connection
from pynetdicom import evt

from gateway import metrics, services
from gateway.dimse import access, guard
from gateway.dimse.sockets import set_nodelay
from gateway.models import Node

log = logging.getLogger("isthmus.dimse")

# Rejected transient, service user, no reason: the registry could not be read.
REJECT_TRANSIENT = (0x02, 0x01, 0x01)


def _peer(assoc) -> tuple[str, int | None]:
    info = assoc.requestor.address_info
    return info.address, info.port


def handle_requested(event: evt.Event) -> None:
    """EVT_REQUESTED: accept or reject an A-ASSOCIATE-RQ against the node registry."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling_ae, called_ae = request.calling_ae_title.strip(), request.called_ae_title.strip()
    peer_address, peer_port = _peer(assoc)
    close_old_connections()
    try:
        # Associations we accepted and that are still open, and this one. Not every acceptor thread:
        # connections that have not asked (yet) are bounded by admission.py, not by this cap.
        open_associations = 1 + sum(1 for other in assoc.ae.active_associations if "isthmus_event_id" in vars(other))
        decision = access.decide(calling_ae, called_ae, peer_address, open_associations)
        association_event = services.record_association(
            decision=decision,
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_address=peer_address,
            peer_port=peer_port,
        )
    except Exception:  # fail closed: an unreadable registry admits nobody
        log.exception("association from %s@%s refused: node registry unavailable", calling_ae, peer_address)
        metrics.ASSOCIATIONS.labels("rejected", "registry-unavailable").inc()
        _reject(assoc, REJECT_TRANSIENT)
        return
    if not decision.accepted:
        log.info("association rejected: %s@%s -> %s (%s)", calling_ae, peer_address, called_ae, decision.reason)
        metrics.ASSOCIATIONS.labels("rejected", decision.reason).inc()
        _reject(assoc, decision.reject)
        return
    log.info("association accepted: %s@%s -> %s", calling_ae, peer_address, called_ae)
    metrics.ASSOCIATIONS.labels("accepted", decision.reason).inc()
    metrics.ACTIVE_ASSOCIATIONS.inc()
    assoc.isthmus_node = decision.node
    assoc.isthmus_event_id = association_event.pk
    assoc.isthmus_requests = 0


def _reject(assoc, reject: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*reject)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()
    connection.close()


def handle_conn_close(event: evt.Event) -> None:
    """EVT_CONN_CLOSE (DUL thread): close the association's event, unless the association thread did."""
    try:
        _finish(event.assoc)
    finally:
        connection.close()


def handle_association_end(event: evt.Event) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_REJECTED (association thread): close the association's event, unless the
    DUL thread did, and give back the database connection.

    Both are needed: a peer that closes just after its request is gone (EVT_CONN_CLOSE) before we accepted it.
    """
    try:
        _finish(event.assoc)
    finally:
        connection.close()


def _finish(assoc) -> None:
    """Record how an accepted association ended, exactly once whichever thread sees the end first."""
    event_id = assoc.__dict__.pop("isthmus_event_id", None)  # atomic: only one closer wins
    if event_id is None:
        return
    metrics.ACTIVE_ASSOCIATIONS.dec()
    outcome = "released" if guard.released(assoc) else "rejected" if assoc.is_rejected else "aborted"
    try:
        services.finish_association(event_id=event_id, outcome=outcome, requests=assoc.isthmus_requests)
    except Exception:
        log.exception("could not record the end of association event %s", event_id)


def allowed(event: evt.Event, service: str) -> bool:
    """Per-node service permission; unregistered callers (when allowed at all) may use everything."""
    event.assoc.isthmus_requests = getattr(event.assoc, "isthmus_requests", 0) + 1
    node: Node | None = getattr(event.assoc, "isthmus_node", None)
    return node is None or node.allows(service)


HANDLERS = [
    (evt.EVT_CONN_OPEN, set_nodelay),
    (evt.EVT_REQUESTED, handle_requested),
    (evt.EVT_RELEASED, handle_association_end),
    (evt.EVT_ABORTED, handle_association_end),
    (evt.EVT_REJECTED, handle_association_end),
    (evt.EVT_CONN_CLOSE, handle_conn_close),
    (evt.EVT_CONN_CLOSE, guard.note_silent_close),
]
