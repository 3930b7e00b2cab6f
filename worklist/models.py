"""Orders, scheduled procedure steps and performed procedure steps (IHE Scheduled Workflow).

Values are kept as DICOM strings (PN with ^ and = groups, DA "YYYYMMDD", TM
"HHMMSS.FFFFFF") so MWL matching (PS3.4 C.2.2.2, K.6) is done in SQL.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Upper

from gateway.models import Node


class Patient(models.Model):
    """Demographics as the RIS/EHR knows them (HL7 PID, ADT updates and merges)."""

    patient_id = models.CharField(max_length=64)
    issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    patient_name = models.CharField(max_length=324, blank=True, help_text="DICOM PN, e.g. DOE^JANE")
    patient_birth_date = models.CharField(max_length=8, blank=True)
    patient_sex = models.CharField(max_length=16, blank=True)
    other_patient_ids = models.JSONField(default=list, blank=True, help_text='[{"id": ..., "issuer": ...}]')
    patient_weight = models.CharField(max_length=16, blank=True, help_text="kg, DS")
    medical_alerts = models.CharField(max_length=64, blank=True)
    allergies = models.CharField(max_length=64, blank=True)
    pregnancy_status = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="1 no, 2 possible, 3 yes, 4 unknown"
    )
    special_needs = models.CharField(max_length=64, blank=True)
    patient_state = models.CharField(max_length=64, blank=True)
    confidentiality_constraint = models.CharField(max_length=64, blank=True)
    merged_into = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="merged")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["patient_id", "issuer_of_patient_id"], name="worklist_patient_id_issuer")
        ]
        indexes = [
            # Pattern opclasses let PostgreSQL answer "DOE*" (LIKE 'DOE%') from the index; SQLite ignores
            # them (its GLOB uses the plain index). The case-insensitive twin on UPPER(patient_name) is
            # created by migration 0003 on PostgreSQL only: an opclass on an expression is not portable.
            models.Index(fields=["patient_name"], name="worklist_patient_name", opclasses=["varchar_pattern_ops"]),
            models.Index(Upper("patient_name"), name="worklist_patient_name_upper"),
        ]

    def __str__(self) -> str:
        return f"patient #{self.pk}"  # never the name or ID: this string reaches logs


class PatientMerge(models.Model):
    """ADT^A40: `merged_patient_id` was merged into `surviving`; kept for audit and undo."""

    surviving = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="merges")
    merged_patient_id = models.CharField(max_length=64)
    merged_issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    message_control_id = models.CharField(max_length=64, blank=True)
    at = models.DateTimeField()


class Order(models.Model):
    """An imaging service request with its requested procedure (one per accession number)."""

    class Status(models.TextChoices):
        SCHEDULED = "SCHEDULED"
        IN_PROGRESS = "IN PROGRESS"
        COMPLETED = "COMPLETED"
        DISCONTINUED = "DISCONTINUED"
        CANCELED = "CANCELED"

    class Source(models.TextChoices):
        HL7 = "hl7", "HL7"
        ADMIN = "admin", "Admin (downtime)"
        API = "api", "REST API"

    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="orders")
    accession_number = models.CharField(max_length=16, db_index=True)
    issuer_of_accession_number = models.CharField(max_length=64, blank=True)
    requested_procedure_id = models.CharField(max_length=16, blank=True)
    requested_procedure_description = models.CharField(max_length=64, blank=True)
    requested_procedure_code = models.JSONField(
        default=dict, blank=True, help_text='{"value": ..., "scheme": ..., "meaning": ...}'
    )
    placer_order_number = models.CharField(max_length=64, blank=True, db_index=True)
    filler_order_number = models.CharField(max_length=64, blank=True, db_index=True)
    referring_physician_name = models.CharField(max_length=324, blank=True)
    requesting_physician = models.CharField(max_length=324, blank=True)
    requested_procedure_priority = models.CharField(
        max_length=16, blank=True, help_text="STAT, HIGH, ROUTINE, MEDIUM, LOW"
    )
    reason_for_requested_procedure = models.CharField(max_length=64, blank=True)
    admission_id = models.CharField(max_length=64, blank=True)
    current_patient_location = models.CharField(max_length=64, blank=True)
    study_instance_uid = models.CharField(max_length=64, unique=True, help_text="assigned when the order is created")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SCHEDULED, db_index=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.HL7)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # One order per accession number and issuer, even when two NW messages race.
        constraints = [
            models.UniqueConstraint(
                fields=["accession_number", "issuer_of_accession_number"], name="worklist_order_accession"
            )
        ]

    def __str__(self) -> str:
        return f"order {self.accession_number}"


# ScheduledStep.CLOSED as plain strings, for the partial indexes in its Meta (which cannot see the class body).
CLOSED_STEP_STATES = ("COMPLETED", "DISCONTINUED", "CANCELED")


class ScheduledStep(models.Model):
    """A Scheduled Procedure Step: one item of the Scheduled Procedure Step Sequence (PS3.3 C.4.10)."""

    class Status(models.TextChoices):
        # PS3.3 C.4.10: Scheduled Procedure Step Status defined terms
        SCHEDULED = "SCHEDULED"
        ARRIVED = "ARRIVED"
        READY = "READY"
        STARTED = "STARTED"
        DEPARTED = "DEPARTED"
        COMPLETED = "COMPLETED"
        DISCONTINUED = "DISCONTINUED"
        CANCELED = "CANCELED"

    # Steps in these states are no longer offered by the worklist.
    CLOSED = (Status.COMPLETED, Status.DISCONTINUED, Status.CANCELED)
    assert CLOSED == CLOSED_STEP_STATES

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="steps")
    step_id = models.CharField(max_length=16)
    station_ae_title = models.CharField(max_length=16, blank=True)
    station_name = models.CharField(max_length=16, blank=True)
    location = models.CharField(max_length=16, blank=True, help_text="Scheduled Procedure Step Location")
    modality = models.CharField(max_length=16, blank=True)
    start_date = models.CharField(max_length=8, blank=True)
    start_time = models.CharField(max_length=16, blank=True)
    performing_physician_name = models.CharField(max_length=324, blank=True)
    description = models.CharField(max_length=64, blank=True)
    protocol_codes = models.JSONField(default=list, blank=True, help_text='[{"value", "scheme", "meaning"}]')
    pre_medication = models.CharField(max_length=64, blank=True)
    contrast_agent = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SCHEDULED)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["order", "step_id"], name="worklist_step_per_order")]
        # Partial indexes over the open steps, with the query's own predicate (open_steps()), so that
        # PostgreSQL uses them for a station's or a modality's day and reads them in answer order.
        indexes = [
            models.Index(
                fields=["station_ae_title", "start_date", "start_time"],
                condition=~Q(status__in=CLOSED_STEP_STATES),
                name="worklist_open_step_station",
            ),
            models.Index(
                fields=["modality", "start_date", "start_time"],
                condition=~Q(status__in=CLOSED_STEP_STATES),
                name="worklist_open_step_modality",
            ),
            models.Index(
                fields=["start_date", "start_time"],
                condition=~Q(status__in=CLOSED_STEP_STATES),
                name="worklist_open_step_start",
            ),
            models.Index(fields=["step_id"], name="worklist_step_id"),
        ]

    def __str__(self) -> str:
        return f"step {self.step_id} of {self.order}"


class PerformedStep(models.Model):
    """A Modality Performed Procedure Step (PS3.4 F.7, PS3.3 C.4.13-C.4.16)."""

    class Status(models.TextChoices):
        IN_PROGRESS = "IN PROGRESS"
        COMPLETED = "COMPLETED"
        DISCONTINUED = "DISCONTINUED"

    sop_instance_uid = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.IN_PROGRESS, db_index=True)
    scheduled_steps = models.ManyToManyField(ScheduledStep, blank=True, related_name="performed_steps")
    matched_patient = models.ForeignKey(
        Patient, null=True, blank=True, on_delete=models.SET_NULL, related_name="performed"
    )
    patient_name = models.CharField(max_length=324, blank=True)
    patient_id = models.CharField(max_length=64, blank=True)
    accession_number = models.CharField(max_length=16, blank=True, db_index=True)
    study_instance_uid = models.CharField(max_length=64, blank=True, db_index=True)
    performed_procedure_step_id = models.CharField(max_length=16, blank=True)
    performed_station_ae_title = models.CharField(max_length=16, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    start_date = models.CharField(max_length=8, blank=True)
    start_time = models.CharField(max_length=16, blank=True)
    end_date = models.CharField(max_length=8, blank=True)
    end_time = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=64, blank=True)
    discontinuation_reason = models.JSONField(default=dict, blank=True)
    performed_series = models.JSONField(default=list, blank=True, help_text="Performed Series Sequence, DICOM JSON")
    attributes = models.JSONField(default=dict, help_text="every attribute received, DICOM JSON, for relaying")
    calling_ae = models.CharField(max_length=16, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    @property
    def unscheduled(self) -> bool:
        return not self.scheduled_steps.exists()

    def __str__(self) -> str:
        return self.sop_instance_uid


class MppsRelay(models.Model):
    """Durable outbox: one N-CREATE or N-SET owed to a downstream MPPS SCP."""

    class State(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    performed_step = models.ForeignKey(PerformedStep, on_delete=models.CASCADE, related_name="relays")
    destination = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="mpps_relays")
    operation = models.CharField(max_length=8, help_text="create or set")
    attributes = models.JSONField(help_text="the dataset to send, DICOM JSON")
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)


class Hl7Message(models.Model):
    """Every HL7 message received, and the acknowledgement sent, keyed by MSH-10 for duplicates."""

    control_id = models.CharField(max_length=64)
    sending_application = models.CharField(max_length=227, blank=True)
    sending_facility = models.CharField(max_length=227, blank=True)
    message_type = models.CharField(max_length=16, help_text="e.g. ORM^O01")
    received_at = models.DateTimeField(db_index=True)
    ack_code = models.CharField(max_length=2, help_text="AA, AE or AR")
    ack = models.TextField(help_text="the ACK sent, replayed for a repeated control ID")
    error = models.TextField(blank=True)
    raw = models.TextField(help_text="the message as received (decoded)")
    peer_address = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["sending_application", "sending_facility", "control_id"], name="hl7_control_id_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.message_type} {self.control_id}"
