"""Writes to the worklist: patients, orders and their scheduled steps, from HL7, the admin or the API.

Every function is keyword-only and runs in one transaction; a change that
cannot be applied raises WorklistError and leaves the database as it was.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.utils import timezone
from pydicom.uid import generate_uid

from worklist.errors import (
    DUPLICATE_KEY,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY,
    WorklistError,
)
from worklist.hl7.mapping import Header, OrderMessage, OrderRequest, PatientMergeRequest, PatientUpdate
from worklist.models import Hl7Message, Order, Patient, PatientMerge, PerformedStep, ScheduledStep

PATIENT_FIELDS = {"patient_name", "patient_birth_date", "patient_sex", "other_patient_ids", "patient_weight",
                  "medical_alerts", "allergies", "pregnancy_status", "special_needs", "patient_state",
                  "confidentiality_constraint"}  # fmt: skip
ORDER_FIELDS = {"accession_number", "issuer_of_accession_number", "requested_procedure_id",
                "requested_procedure_description", "requested_procedure_code", "placer_order_number",
                "filler_order_number", "referring_physician_name", "requesting_physician",
                "requested_procedure_priority", "reason_for_requested_procedure", "admission_id",
                "current_patient_location"}  # fmt: skip
STEP_FIELDS = {"step_id", "station_ae_title", "station_name", "location", "modality", "start_date", "start_time",
               "performing_physician_name", "description", "protocol_codes", "pre_medication", "contrast_agent"}  # fmt: skip
CLOSED_ORDER = (Order.Status.COMPLETED, Order.Status.CANCELED, Order.Status.DISCONTINUED)
# ORC-5 order status (HL7 Table 0038) for ORC-1 SC -> our order status.
ORDER_STATUS = {
    "SC": Order.Status.SCHEDULED,
    "IP": Order.Status.IN_PROGRESS,
    "CM": Order.Status.COMPLETED,
    "CA": Order.Status.CANCELED,
    "DC": Order.Status.DISCONTINUED,
}
STEP_STATUS_FOR_ORDER = {
    Order.Status.COMPLETED: ScheduledStep.Status.COMPLETED,
    Order.Status.CANCELED: ScheduledStep.Status.CANCELED,
    Order.Status.DISCONTINUED: ScheduledStep.Status.DISCONTINUED,
}
MAX_MERGE_HOPS = 10


def new_study_uid() -> str:
    """Study Instance UID for a new order (PS3.5 9.1; pydicom's root with a random suffix)."""
    return generate_uid()


def next_step_id(taken: set[str]) -> str:
    """The first of "1", "2", ... not used by the order's steps (when the sender gave no step ID)."""
    number = 1
    while str(number) in taken:
        number += 1
    return str(number)


def prepare_new_order(*, order: Order, source: str) -> Order:
    """What every new order gets before its first save: a Study Instance UID and where it came from."""
    order.source = source
    order.study_instance_uid = order.study_instance_uid or new_study_uid()
    order.requested_procedure_id = order.requested_procedure_id or order.accession_number
    return order


def _present(values: dict, allowed: set[str]) -> dict:
    return {key: value for key, value in values.items() if key in allowed and value is not None}


# --- patients --------------------------------------------------------------------


@transaction.atomic
def upsert_patient(*, demographics: dict) -> Patient:
    """Create or update by (patient ID, issuer); fields absent from `demographics` (None) keep their value."""
    patient_id = (demographics.get("patient_id") or "").strip()
    if not patient_id:
        raise WorklistError("patient ID missing", code=REQUIRED_FIELD_MISSING, location="PID-3")
    values = _present(demographics, PATIENT_FIELDS)
    patient, created = Patient.objects.select_for_update().get_or_create(
        patient_id=patient_id, issuer_of_patient_id=demographics.get("issuer_of_patient_id") or "", defaults=values
    )
    if not created and values:
        for name, value in values.items():
            setattr(patient, name, value)
        patient.save(update_fields=[*values, "updated_at"])
    return patient


def surviving(patient: Patient) -> Patient:
    """The patient a merged record now lives on (ADT^A40), or the patient itself."""
    for _ in range(MAX_MERGE_HOPS):
        if patient.merged_into_id is None:
            return patient
        patient = patient.merged_into
    return patient


@transaction.atomic
def merge_patients(*, demographics: dict, merged_patient_id: str, merged_issuer: str, control_id: str = "") -> Patient:
    """ADT^A40: move the merged patient's orders and performed steps to the surviving one; keep both rows."""
    survivor = upsert_patient(demographics=demographics)
    merged = (
        Patient.objects.select_for_update()
        .filter(patient_id=merged_patient_id, issuer_of_patient_id=merged_issuer)
        .first()
    )
    if merged is not None and merged.pk == survivor.pk:
        raise WorklistError("MRG-1 names the surviving patient", code=DUPLICATE_KEY, location="MRG-1")
    if merged is not None:
        Order.objects.filter(patient=merged).update(patient=survivor, updated_at=timezone.now())
        PerformedStep.objects.filter(matched_patient=merged).update(matched_patient=survivor)
        Patient.objects.filter(merged_into=merged).update(merged_into=survivor)
        merged.merged_into = survivor
        merged.save(update_fields=["merged_into", "updated_at"])
    alias = {"id": merged_patient_id, "issuer": merged_issuer}
    if alias not in survivor.other_patient_ids:
        survivor.other_patient_ids = [*survivor.other_patient_ids, alias]
        survivor.save(update_fields=["other_patient_ids", "updated_at"])
    PatientMerge.objects.create(
        surviving=survivor,
        merged_patient_id=merged_patient_id,
        merged_issuer_of_patient_id=merged_issuer,
        message_control_id=control_id[:64],
        at=timezone.now(),
    )
    return survivor


# --- orders -------------------------------------------------------------------------


def find_order(*, accession_number: str = "", issuer: str = "", filler: str = "", placer: str = "") -> Order | None:
    """The order a change names: by accession number, else filler, else placer order number (ORC-3, ORC-2)."""
    orders = Order.objects.select_for_update()
    if accession_number:
        orders = orders.filter(accession_number=accession_number)
        if issuer:
            orders = orders.filter(issuer_of_accession_number__in=[issuer, ""])
    elif filler:
        orders = orders.filter(filler_order_number=filler)
    elif placer:
        orders = orders.filter(placer_order_number=placer)
    else:
        return None
    return orders.order_by("-pk").first()


@transaction.atomic
def create_order(*, patient: Patient, order: dict, steps: list[dict], source: str = Order.Source.HL7) -> Order:
    """A new order with its scheduled steps; the Study Instance UID is assigned here unless the RIS sent one."""
    values = _present(order, ORDER_FIELDS)
    accession_number = values.get("accession_number", "")
    if not accession_number:
        raise WorklistError("accession number missing", code=REQUIRED_FIELD_MISSING, location="OBR-18")
    issuer = values.get("issuer_of_accession_number", "")
    if find_order(accession_number=accession_number, issuer=issuer) is not None:
        raise WorklistError(f"order {accession_number} exists", code=DUPLICATE_KEY, location="OBR-18")
    study_uid = order.get("study_instance_uid") or new_study_uid()
    if Order.objects.filter(study_instance_uid=study_uid).exists():
        raise WorklistError("Study Instance UID belongs to another order", code=DUPLICATE_KEY, location="ZDS-1")
    created = prepare_new_order(order=Order(patient=patient, study_instance_uid=study_uid, **values), source=source)
    created.save()
    taken: set[str] = set()
    for step in steps or [{}]:
        step_values = _present(step, STEP_FIELDS)
        step_values["step_id"] = step_values.get("step_id") or next_step_id(taken)
        if step_values["step_id"] in taken:
            raise WorklistError(f"step ID {step_values['step_id']} given twice", code=DUPLICATE_KEY, location="OBR-20")
        taken.add(step_values["step_id"])
        ScheduledStep.objects.create(order=created, **step_values)
    return created


@transaction.atomic
def change_order(
    *, order: Order, changes: dict, steps: list[dict] | None = None, patient: Patient | None = None
) -> Order:
    """Update an open order and its steps (matched by step ID); a closed order is not reopened by a change."""
    order = Order.objects.select_for_update().get(pk=order.pk)
    if order.status in CLOSED_ORDER:
        raise WorklistError(f"order {order.accession_number} is {order.status.lower()}", code=UNKNOWN_KEY)
    values = _present(changes, ORDER_FIELDS)
    new_accession = values.get("accession_number")
    if new_accession and new_accession != order.accession_number:
        other = find_order(accession_number=new_accession, issuer=values.get("issuer_of_accession_number", ""))
        if other is not None and other.pk != order.pk:
            raise WorklistError(f"order {new_accession} exists", code=DUPLICATE_KEY, location="OBR-18")
    for name, value in values.items():
        setattr(order, name, value)
    if patient is not None:
        order.patient = patient
    order.save()
    existing = list(order.steps.all())
    for step in steps or []:
        step_values = _present(step, STEP_FIELDS)
        step_id = step_values.pop("step_id", None) or (existing[0].step_id if len(existing) == 1 else "1")
        ScheduledStep.objects.update_or_create(order=order, step_id=step_id, defaults=step_values)
    return order


@transaction.atomic
def cancel_order(*, order: Order, status: str = Order.Status.CANCELED) -> Order:
    """Cancel, discontinue or complete an order; its open steps follow and so leave the worklist."""
    order = Order.objects.select_for_update().get(pk=order.pk)
    if order.status == Order.Status.COMPLETED and status != Order.Status.COMPLETED:
        raise WorklistError(f"order {order.accession_number} is already completed", code=UNKNOWN_KEY)
    order.status = status
    order.save(update_fields=["status", "updated_at"])
    step_status = STEP_STATUS_FOR_ORDER.get(status)
    if step_status is not None:
        order.steps.exclude(status__in=ScheduledStep.CLOSED).update(status=step_status, updated_at=timezone.now())
    return order


@transaction.atomic
def set_order_status(*, order: Order, status: str) -> Order:
    if status in STEP_STATUS_FOR_ORDER:
        return cancel_order(order=order, status=status)
    Order.objects.filter(pk=order.pk).update(status=status, updated_at=timezone.now())
    order.refresh_from_db()
    return order


@transaction.atomic
def apply_order(*, patient: Patient, request: OrderRequest) -> Order:
    """One ORC group of ORM^O01 / OMI^O23: NW creates, XO changes, CA/DC close, SC sets the status."""
    patient = surviving(patient)
    if request.control == "NW":
        return create_order(patient=patient, order=request.order, steps=request.steps, source=Order.Source.HL7)
    key = request.order
    order = find_order(
        accession_number=key.get("accession_number", ""),
        issuer=key.get("issuer_of_accession_number", ""),
        filler=key.get("filler_order_number", ""),
        placer=key.get("placer_order_number", ""),
    )
    if order is None:
        if not any(key.get(name) for name in ("accession_number", "filler_order_number", "placer_order_number")):
            raise WorklistError("accession number missing", code=REQUIRED_FIELD_MISSING, location="OBR-18")
        raise WorklistError(f"unknown order {key.get('accession_number', '')}".strip(), code=UNKNOWN_KEY,
                            location="OBR-18")  # fmt: skip
    if request.control == "XO":
        steps = [step for step in request.steps if any(value is not None for value in step.values())]
        return change_order(order=order, changes=request.order, steps=steps, patient=patient)
    if request.control == "CA":
        return cancel_order(order=order, status=Order.Status.CANCELED)
    if request.control == "DC":
        return cancel_order(order=order, status=Order.Status.DISCONTINUED)
    status = ORDER_STATUS.get(request.order_status)
    if status is None:
        raise WorklistError(f"ORC-5 order status {request.order_status or '(empty)'} not handled",
                            code=TABLE_VALUE_NOT_FOUND, location="ORC-5")  # fmt: skip
    return set_order_status(order=order, status=status)


# --- HL7 messages ---------------------------------------------------------------------


def _message_key(header: Header) -> dict:
    return {
        "sending_application": header.sending_application[:227],
        "sending_facility": header.sending_facility[:227],
        "control_id": header.control_id[:64],
    }


def stored_ack(*, header: Header) -> Hl7Message | None:
    """The message already applied under this control ID (MSH-10), whose ACK is replayed."""
    if not header.control_id:
        return None
    return Hl7Message.objects.filter(**_message_key(header), ack_code="AA").first()


def apply_content(*, content: OrderMessage | PatientUpdate | PatientMergeRequest, control_id: str) -> list[Order]:
    """Apply a mapped message; returns the orders it touched (for the log line)."""
    if isinstance(content, PatientUpdate):
        upsert_patient(demographics=content.patient)
        return []
    if isinstance(content, PatientMergeRequest):
        merge_patients(demographics=content.patient, merged_patient_id=content.merged_patient_id,
                       merged_issuer=content.merged_issuer, control_id=control_id)  # fmt: skip
        return []
    patient = upsert_patient(demographics=content.patient)
    return [apply_order(patient=patient, request=request) for request in content.orders]


def apply_hl7(
    *, header: Header, content, raw: str, ack: str, peer_address: str = ""
) -> tuple[Hl7Message, bool, list[Order]]:
    """Apply a message and record it with its AA in one transaction: (row, applied now, orders).

    The control ID's unique constraint makes a repeat, even a concurrent one,
    come back as the stored message instead of being applied twice.
    """
    key = _message_key(header)
    values = _message_values(header, raw, ack, "AA", "", peer_address)
    try:
        with transaction.atomic():
            existing = Hl7Message.objects.select_for_update().filter(**key).first()
            if existing is not None and existing.ack_code == "AA":
                return existing, False, []
            # The row goes first: a concurrent copy then waits on the unique index and finds it committed.
            if existing is not None:  # an earlier attempt failed (AE/AR) and changed nothing
                Hl7Message.objects.filter(pk=existing.pk).update(**values)
                row = Hl7Message.objects.get(pk=existing.pk)
            else:
                row = Hl7Message.objects.create(**key, **values)
            orders = apply_content(content=content, control_id=header.control_id)
            return row, True, orders
    except IntegrityError:
        replay = stored_ack(header=header)
        if replay is None:
            raise
        return replay, False, []


def record_failure(*, header: Header, raw: str, ack: str, ack_code: str, error: str, peer_address: str = "") -> None:
    """Keep a message answered AE or AR; a later attempt with the same control ID is processed again."""
    if not header.control_id:
        return
    key = _message_key(header)
    try:
        _record_failure(key, _message_values(header, raw, ack, ack_code, error, peer_address))
    except IntegrityError:  # a concurrent copy recorded it first
        pass


@transaction.atomic
def _record_failure(key: dict, values: dict) -> None:
    updated = Hl7Message.objects.filter(**key).exclude(ack_code="AA").update(**values)
    if not updated and not Hl7Message.objects.filter(**key).exists():
        Hl7Message.objects.create(**key, **values)


def _message_values(header: Header, raw: str, ack: str, ack_code: str, error: str, peer_address: str) -> dict:
    return {
        "message_type": header.message_type[:16],
        "received_at": timezone.now(),
        "ack_code": ack_code,
        "ack": ack,
        "error": error,
        "raw": raw.replace("\x00", ""),  # PostgreSQL text cannot hold NUL
        "peer_address": peer_address[:64],
    }
