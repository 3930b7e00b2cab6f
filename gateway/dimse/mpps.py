"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET, thin over worklist/mpps.py."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from gateway import metrics
from gateway.dimse.handlers import allowed
from gateway.dimse.status import Status
from worklist import mpps

log = logging.getLogger("isthmus.dimse")


def add_contexts(ae: AE) -> None:
    ae.add_supported_context(ModalityPerformedProcedureStep)


def _answer(operation: str, error: mpps.MppsError | None) -> Dataset:
    status = Dataset()
    status.Status = Status.SUCCESS if error is None else error.status
    if error is not None:
        status.ErrorComment = str(error)[:64]
        if error.error_id is not None:
            status.ErrorID = error.error_id
    metrics.DIMSE_REQUESTS.labels(operation, f"0x{status.Status:04X}").inc()
    return status


def _refused(event: evt.Event, operation: str, error: mpps.MppsError) -> tuple[Dataset, None]:
    log.info("MPPS %s from %s refused (0x%04X): %s", operation, event.assoc.requestor.ae_title, error.status, error)
    return _answer(operation, error), None


def handle_create(event: evt.Event) -> tuple[Dataset, Dataset | None]:
    """EVT_N_CREATE: a modality starts a procedure step (IN PROGRESS)."""
    if not allowed(event, "mpps"):
        return _answer("mpps-create", mpps.MppsError(Status.REFUSED_NOT_AUTHORIZED, "not authorised for MPPS")), None
    # PS3.7 10.1.5.1.4: without an Affected SOP Instance UID the SCP assigns one and returns it.
    uid = event.request.AffectedSOPInstanceUID or generate_uid()
    try:
        mpps.create(
            sop_instance_uid=str(uid), attributes=event.attribute_list, calling_ae=event.assoc.requestor.ae_title
        )
    except mpps.MppsError as error:
        return _refused(event, "mpps-create", error)
    answer = Dataset()
    if not event.request.AffectedSOPInstanceUID:
        answer.AffectedSOPInstanceUID = uid
    return _answer("mpps-create", None), answer


def handle_set(event: evt.Event) -> tuple[Dataset, Dataset | None]:
    """EVT_N_SET: the modality updates, completes or discontinues the step."""
    if not allowed(event, "mpps"):
        return _answer("mpps-set", mpps.MppsError(Status.REFUSED_NOT_AUTHORIZED, "not authorised for MPPS")), None
    uid = str(event.request.RequestedSOPInstanceUID)
    try:
        mpps.update(sop_instance_uid=uid, modifications=event.attribute_list, calling_ae=event.assoc.requestor.ae_title)
    except mpps.MppsError as error:
        return _refused(event, "mpps-set", error)
    return _answer("mpps-set", None), None


HANDLERS = [(evt.EVT_N_CREATE, handle_create), (evt.EVT_N_SET, handle_set)]
