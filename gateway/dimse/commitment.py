"""Storage Commitment Push Model SOP Class as SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

The report must follow the N-ACTION response, which pynetdicom sends after the
handler returns. So the handler records the request and marks the
association; once the response's last PDU is on the wire (EVT_PDU_SENT) a
short-lived thread sends the report on the same association, when the requester
accepted the SCP role for it, or rings a worker to send it on a new one.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from gateway import commitment, metrics
from gateway.dimse.handlers import allowed
from gateway.dimse.status import Status

log = logging.getLogger("isthmus.dimse")

# PS3.7 10.1.4.1.10 and Annex C: N-ACTION failures this SCP answers with.
Status.add("NO_SUCH_SOP_INSTANCE", 0x0112)  # not the well-known Storage Commitment instance
Status.add("INVALID_ARGUMENT_VALUE", 0x0115)  # Action Information missing, empty or malformed
Status.add("NO_SUCH_ACTION", 0x0123)  # Action Type ID other than 1

# Set on an association between our N-ACTION handler and its response going out.
AFTER_RESPONSE = "isthmus_commitment_after_response"


def add_contexts(ae: AE) -> None:
    """We are SCP; accepting the requester's SCP role lets us send it the report on its association."""
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)


def handle_n_action(event: evt.Event) -> tuple[int, None]:
    """EVT_N_ACTION: PS3.4 J.3.2, a Request Storage Commitment."""
    status = _n_action(event)
    metrics.DIMSE_REQUESTS.labels("commitment", f"0x{status:04X}").inc()
    return status, None


def _n_action(event: evt.Event) -> int:
    assoc, request = event.assoc, event.request
    calling_ae = str(assoc.requestor.ae_title).strip()
    if not allowed(event, "commitment"):
        log.info("storage commitment from %s refused: node not allowed commitment", calling_ae)
        return Status.REFUSED_NOT_AUTHORIZED
    if request.RequestedSOPInstanceUID != StorageCommitmentPushModelInstance:  # PS3.4 J.3.2.1: well-known UID
        log.info("storage commitment from %s for instance %s: no such instance", calling_ae,
                 request.RequestedSOPInstanceUID)  # fmt: skip
        return Status.NO_SUCH_SOP_INSTANCE
    if request.ActionTypeID != commitment.REQUEST_STORAGE_COMMITMENT:
        log.info("storage commitment from %s: no such action %s", calling_ae, request.ActionTypeID)
        return Status.NO_SUCH_ACTION
    try:
        transaction_uid, referenced = commitment.parse_action_information(_action_information(event))
    except commitment.InvalidRequest as exc:
        log.info("storage commitment from %s refused: %s", calling_ae, exc)
        return Status.INVALID_ARGUMENT_VALUE
    close_old_connections()
    try:
        recorded = commitment.record_request(
            transaction_uid=transaction_uid,
            referenced=referenced,
            node=getattr(assoc, "isthmus_node", None),
            calling_ae=calling_ae,
            peer_address=assoc.requestor.address_info.address,
        )
    except DatabaseError:
        log.exception("storage commitment %s from %s not recorded", transaction_uid, calling_ae)
        return Status.PROCESSING_FAILURE
    log.info("storage commitment %s from %s: %d referenced, %d committed", transaction_uid, calling_ae,
             len(referenced), len(recorded.success))  # fmt: skip
    setattr(assoc, AFTER_RESPONSE, (recorded.pk, may_report_here(event)))
    return Status.SUCCESS


def _action_information(event: evt.Event) -> Dataset | None:
    """The decoded Action Information; pydicom parses lazily, so touch every element here."""
    try:
        info = event.action_information
        for _ in info.iterall():
            pass
        return info
    except Exception as exc:
        raise commitment.InvalidRequest(f"Action Information cannot be decoded ({type(exc).__name__})") from exc


def may_report_here(event: evt.Event) -> bool:
    """True when the requester accepted that we send requests (the SCP role) on this context."""
    context_id = event.context.context_id
    return any(cx.context_id == context_id and cx.as_scu for cx in event.assoc.accepted_contexts)


def handle_pdu_sent(event: evt.Event) -> None:
    """EVT_PDU_SENT (DUL thread): after the N-ACTION response, report or ring, off this thread."""
    assoc = event.assoc
    if AFTER_RESPONSE not in assoc.__dict__ or not _ends_a_command(event.pdu):
        return
    pending = assoc.__dict__.pop(AFTER_RESPONSE, None)  # atomic: one thread per request
    if pending is not None:
        threading.Thread(target=after_response, args=(assoc, *pending), name="commitment-report", daemon=True).start()


def _ends_a_command(pdu) -> bool:
    # PS3.8 E.2: message control header bit 0 = command, bit 1 = last fragment.
    items = getattr(pdu, "presentation_data_value_items", None) if isinstance(pdu, P_DATA_TF) else None
    return bool(items) and any(item.data and item.data[0] & 0x03 == 0x03 for item in items)


def after_response(assoc, commitment_id: int, here: bool) -> None:
    """Send the report on the requester's association when possible, else hand it to a worker."""
    try:
        if here and report_on_association(assoc, commitment_id):
            return
        commitment.ring(commitment_id=commitment_id)
    except Exception:  # the row stays PENDING; the sweeper delivers it when its lease ends
        log.exception("storage commitment report %s: could not be sent or queued", commitment_id)
    finally:
        connection.close()


def report_on_association(assoc, commitment_id: int) -> bool:
    """One attempt on the requester's own association; False means try a new association."""
    claimed = commitment.begin_attempt(commitment_id=commitment_id)
    if claimed is None:
        return True  # settled or in hand elsewhere
    via = "on the requester's association"
    try:
        event_type, info = commitment.event_report(claimed)
        _send_on_association(assoc, event_type, info)
    except commitment.DeliveryError as error:
        commitment.finish_attempt(claimed, error=error, via=via, retry_at=timezone.now())
        return False
    commitment.finish_attempt(claimed, error=None, via=via)
    return True


def _send_on_association(assoc, event_type: int, info: Dataset) -> None:
    if not _park_reactor(assoc, timeout=settings.DIMSE_TIMEOUT):
        raise commitment.DeliveryError("the requester ended the association before the report")
    try:
        status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                              StorageCommitmentPushModelInstance)  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        raise commitment.DeliveryError(str(exc)) from exc
    finally:
        assoc._reactor_checkpoint.set()
    commitment.check_report_status(status)


def _park_reactor(assoc, timeout: float) -> bool:
    """Pause the association's reactor as pynetdicom's send_* do, but give up instead of spinning.

    pynetdicom 3.0.4's send_* wait for the reactor with no limit; if the peer
    releases at that moment the reactor exits and they spin for ever. We wait
    here, bounded, first for the reactor to leave the N-ACTION handler (where
    it also reads as paused), then for it to stop at its checkpoint.
    """
    deadline = time.monotonic() + timeout
    while assoc._is_paused:
        if time.monotonic() > deadline or not assoc.is_established:
            return False
        time.sleep(0.0002)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        if time.monotonic() > deadline or not assoc.is_established:
            assoc._reactor_checkpoint.set()
            return False
        time.sleep(0.0002)
    if assoc.is_established:
        return True
    assoc._reactor_checkpoint.set()
    return False


HANDLERS = [(evt.EVT_N_ACTION, handle_n_action), (evt.EVT_PDU_SENT, handle_pdu_sent)]
