"""Modality Performed Procedure Step SCP (PS3.4 F.7): the state machine, links to scheduled steps, relay rows.

IN PROGRESS (N-CREATE) -> COMPLETED or DISCONTINUED (N-SET), and nothing
after that. Every failure is raised before anything is written, so a refused
request changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from gateway.dimse.status import Status
from gateway.models import Node
from worklist.models import MppsRelay, Order, PerformedStep, ScheduledStep

log = logging.getLogger("isthmus.mpps")

# PS3.7 C.4 / PS3.4 F.7.2.1.2 and F.7.2.2.2 statuses of N-CREATE and N-SET.
Status.add("INVALID_ATTRIBUTE_VALUE", 0x0106)
Status.add("NO_SUCH_OBJECT_INSTANCE", 0x0112)
Status.add("MISSING_ATTRIBUTE", 0x0120)
Status.add("MISSING_ATTRIBUTE_VALUE", 0x0121)
# PS3.4 F.7.2.2.2: Error ID with Processing Failure, "Performed Procedure Step Object may no longer be updated".
MAY_NO_LONGER_BE_UPDATED = 0xA710

IN_PROGRESS, COMPLETED, DISCONTINUED = (
    PerformedStep.Status.IN_PROGRESS,
    PerformedStep.Status.COMPLETED,
    PerformedStep.Status.DISCONTINUED,
)
FINAL = (COMPLETED, DISCONTINUED)

# PS3.4 Table F.7.2-1, N-CREATE type 1: present and not empty.
CREATE_REQUIRED = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
# PS3.4 Table F.7.2-1, final state requirements (checked on the merged attributes).
FINAL_REQUIRED = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
SERIES_REQUIRED = ("SeriesInstanceUID", "ProtocolName")
# A step in these states becomes STARTED when a modality begins it.
STARTABLE = (ScheduledStep.Status.SCHEDULED, ScheduledStep.Status.ARRIVED, ScheduledStep.Status.READY)


@dataclass
class MppsError(Exception):
    """A refused N-CREATE / N-SET: the DIMSE status, a comment (no patient data) and an optional Error ID."""

    status: int
    comment: str
    error_id: int | None = None

    def __str__(self) -> str:
        return self.comment


def _has_value(dataset: Dataset, keyword: str) -> bool:
    value = dataset[keyword].value
    if isinstance(value, (list, MultiValue, Sequence)):
        return len(value) > 0
    return value is not None and str(value).strip() != ""


def _require(dataset: Dataset, keywords: tuple[str, ...], where: str = "") -> None:
    for keyword in keywords:
        if keyword not in dataset:
            raise MppsError(Status.MISSING_ATTRIBUTE, f"{where}{keyword} missing")
        if not _has_value(dataset, keyword):
            raise MppsError(Status.MISSING_ATTRIBUTE_VALUE, f"{where}{keyword} has no value")


def _text(dataset: Dataset, keyword: str, length: int) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()[:length]


def _json(dataset: Dataset) -> dict:
    return dataset.to_json_dict(bulk_data_threshold=1 << 30)


def _check_create(sop_instance_uid: str, attributes: Dataset) -> None:
    """PS3.4 F.7.2.1: an N-CREATE starts a step IN PROGRESS, with its type 1 attributes."""
    if not sop_instance_uid or len(sop_instance_uid) > 64 or not UID(sop_instance_uid).is_valid:
        raise MppsError(Status.INVALID_ATTRIBUTE_VALUE, "Affected SOP Instance UID is not a valid UID")
    _require(attributes, CREATE_REQUIRED)
    for number, item in enumerate(attributes.ScheduledStepAttributesSequence, 1):
        _require(item, ("StudyInstanceUID",), f"Scheduled Step Attributes Sequence item {number}: ")
    status = _text(attributes, "PerformedProcedureStepStatus", 16)
    if status != IN_PROGRESS:
        raise MppsError(Status.INVALID_ATTRIBUTE_VALUE, "N-CREATE status must be IN PROGRESS")


def _scheduled_steps(attributes: Dataset) -> list[ScheduledStep]:
    """The scheduled steps named by Scheduled Step Attributes Sequence (accession number, step ID, study UID)."""
    found: dict[int, ScheduledStep] = {}
    for item in attributes.ScheduledStepAttributesSequence:
        accession = _text(item, "AccessionNumber", 16)
        step_id = _text(item, "ScheduledProcedureStepID", 16)
        if not accession and not step_id:
            continue  # PS3.4 F.7.2 unscheduled case: only a study UID the modality made up
        steps = ScheduledStep.objects.select_related("order")
        if step_id:
            steps = steps.filter(step_id=step_id)
        if accession:
            steps = steps.filter(order__accession_number=accession)
        else:
            steps = steps.filter(order__study_instance_uid=_text(item, "StudyInstanceUID", 64))
        found.update({step.pk: step for step in steps[:10]})
    return list(found.values())


def _fields(attributes: Dataset) -> dict:
    """The columns of a PerformedStep that come straight from its attributes."""
    item = attributes.ScheduledStepAttributesSequence[0] if attributes.get("ScheduledStepAttributesSequence") else None
    fields = {
        "patient_name": _text(attributes, "PatientName", 324),
        "patient_id": _text(attributes, "PatientID", 64),
        "performed_procedure_step_id": _text(attributes, "PerformedProcedureStepID", 16),
        "performed_station_ae_title": _text(attributes, "PerformedStationAETitle", 16),
        "modality": _text(attributes, "Modality", 16),
        "start_date": _text(attributes, "PerformedProcedureStepStartDate", 8),
        "start_time": _text(attributes, "PerformedProcedureStepStartTime", 16),
        "end_date": _text(attributes, "PerformedProcedureStepEndDate", 8),
        "end_time": _text(attributes, "PerformedProcedureStepEndTime", 16),
        "description": _text(attributes, "PerformedProcedureStepDescription", 64),
    }
    if item is not None:
        fields["accession_number"] = _text(item, "AccessionNumber", 16)
        fields["study_instance_uid"] = _text(item, "StudyInstanceUID", 64)
    return fields


def create(*, sop_instance_uid: str, attributes: Dataset, calling_ae: str = "") -> PerformedStep:
    """N-CREATE: record the step IN PROGRESS, start its scheduled steps, and owe a copy to each relay node."""
    _check_create(sop_instance_uid, attributes)
    if PerformedStep.objects.filter(sop_instance_uid=sop_instance_uid).exists():
        raise MppsError(Status.DUPLICATE_SOP_INSTANCE, f"MPPS {sop_instance_uid} already exists")
    try:
        with transaction.atomic():
            scheduled = _scheduled_steps(attributes)
            patient = scheduled[0].order.patient if scheduled else None
            performed = PerformedStep.objects.create(
                sop_instance_uid=sop_instance_uid,
                status=IN_PROGRESS,
                matched_patient=patient,
                attributes=_json(attributes),
                calling_ae=calling_ae[:16],
                **_fields(attributes),
            )
            performed.scheduled_steps.set(scheduled)
            _move_scheduled(scheduled, IN_PROGRESS)
            _owe_relays(performed, "create", attributes)
    except IntegrityError:  # a concurrent N-CREATE with the same UID won the race
        raise MppsError(Status.DUPLICATE_SOP_INSTANCE, f"MPPS {sop_instance_uid} already exists") from None
    log.info(
        "MPPS %s IN PROGRESS from %s: %s",
        sop_instance_uid,
        calling_ae,
        ", ".join(f"step {s.step_id} of {s.order.accession_number}" for s in scheduled) or "unscheduled",
    )
    return performed


def _check_set(performed: PerformedStep, merged: Dataset) -> str:
    """PS3.4 F.7.2.2: the new status, once the transition and the final state requirements are checked."""
    if performed.status in FINAL:
        raise MppsError(
            Status.PROCESSING_FAILURE,
            f"MPPS {performed.sop_instance_uid} is {performed.status} and may no longer be updated",
            MAY_NO_LONGER_BE_UPDATED,
        )
    status = _text(merged, "PerformedProcedureStepStatus", 16)
    if status not in (IN_PROGRESS, *FINAL):
        raise MppsError(Status.INVALID_ATTRIBUTE_VALUE, "status must be IN PROGRESS, COMPLETED or DISCONTINUED")
    if status in FINAL:
        _require(merged, FINAL_REQUIRED)
        if "PerformedSeriesSequence" not in merged:
            raise MppsError(Status.MISSING_ATTRIBUTE, "PerformedSeriesSequence missing")
        series = merged.PerformedSeriesSequence
        if status == COMPLETED and not series:
            raise MppsError(Status.MISSING_ATTRIBUTE_VALUE, "COMPLETED with an empty PerformedSeriesSequence")
        for number, item in enumerate(series, 1):
            _require(item, SERIES_REQUIRED, f"Performed Series Sequence item {number}: ")
    return status


def update(*, sop_instance_uid: str, modifications: Dataset, calling_ae: str = "") -> PerformedStep:
    """N-SET: apply the modifications, and on COMPLETED / DISCONTINUED close the scheduled steps."""
    with transaction.atomic():
        performed = PerformedStep.objects.select_for_update().filter(sop_instance_uid=sop_instance_uid).first()
        if performed is None:
            raise MppsError(Status.NO_SUCH_OBJECT_INSTANCE, f"no MPPS {sop_instance_uid}")
        merged = Dataset.from_json({**performed.attributes, **_json(modifications)})
        status = _check_set(performed, merged)
        performed.attributes = _json(merged)
        performed.status = status
        performed.discontinuation_reason = _first_item_json(
            merged, "PerformedProcedureStepDiscontinuationReasonCodeSequence"
        )
        performed.performed_series = [_json(item) for item in merged.get("PerformedSeriesSequence") or []]
        for name, value in _fields(merged).items():
            setattr(performed, name, value)
        performed.save()
        scheduled = list(performed.scheduled_steps.select_related("order"))
        _move_scheduled(scheduled, status)
        _owe_relays(performed, "set", modifications)
    log.info("MPPS %s now %s (N-SET from %s)", sop_instance_uid, status, calling_ae)
    return performed


def _first_item_json(dataset: Dataset, keyword: str) -> dict:
    items = dataset.get(keyword) or []
    return _json(items[0]) if items else {}


def _move_scheduled(scheduled: list[ScheduledStep], performed_status: str) -> None:
    """Move the scheduled steps (and their orders) along with the performed step."""
    now = timezone.now()
    if performed_status == IN_PROGRESS:
        ids = [step.pk for step in scheduled if step.status in STARTABLE]
        ScheduledStep.objects.filter(pk__in=ids).update(status=ScheduledStep.Status.STARTED, updated_at=now)
        Order.objects.filter(steps__pk__in=ids, status=Order.Status.SCHEDULED).update(
            status=Order.Status.IN_PROGRESS, updated_at=now
        )
        return
    target = ScheduledStep.Status.COMPLETED if performed_status == COMPLETED else ScheduledStep.Status.DISCONTINUED
    ids = [step.pk for step in scheduled if step.status not in ScheduledStep.CLOSED]
    ScheduledStep.objects.filter(pk__in=ids).update(status=target, updated_at=now)
    for order in {step.order for step in scheduled}:
        _close_order_when_done(order)


def _close_order_when_done(order: Order) -> None:
    statuses = set(order.steps.values_list("status", flat=True))
    if not statuses or not statuses <= set(ScheduledStep.CLOSED) or order.status == Order.Status.CANCELED:
        return
    final = Order.Status.COMPLETED if ScheduledStep.Status.COMPLETED in statuses else Order.Status.DISCONTINUED
    Order.objects.filter(pk=order.pk).update(status=final, updated_at=timezone.now())


def _owe_relays(performed: PerformedStep, operation: str, dataset: Dataset) -> None:
    """One outbox row per relay node, in the same transaction as the change it relays."""
    names = settings.MPPS_RELAY_NODES
    if not names:
        return
    nodes = list(Node.objects.filter(name__in=names, enabled=True))
    missing = set(names) - {node.name for node in nodes}
    if missing:
        log.warning("MPPS relay nodes not registered or disabled: %s", ", ".join(sorted(missing)))
    now = timezone.now()
    MppsRelay.objects.bulk_create(
        MppsRelay(
            performed_step=performed,
            destination=node,
            operation=operation,
            attributes=_json(dataset),
            next_attempt_at=now,
        )
        for node in nodes
    )
    if nodes:
        from worklist import relay

        relay.ring(performed_step_id=performed.pk)
