"""Remote DICOM nodes, the associations they open, and process heartbeats."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from gateway.env import AE_TITLE_RE

SERVICES = ("echo", "store", "worklist", "mpps", "query_retrieve", "commitment")


def validate_ae_title(value: str) -> None:
    """PS3.5 6.2: 1-16 characters, no backslash or control characters."""
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise ValidationError("An AE title is 1 to 16 printable characters without backslash, not only spaces.")


class Node(models.Model):
    """A remote application entity: a modality, PACS, workstation or AI engine."""

    name = models.SlugField(max_length=64, unique=True, help_text="Short unique name, used in config files.")
    ae_title = models.CharField("AE title", max_length=16, validators=[validate_ae_title], db_index=True)
    host = models.CharField(
        max_length=255,
        blank=True,
        help_text="Host name or IP address. Associations from other addresses are refused; blank accepts any.",
    )
    port = models.PositiveIntegerField(default=104, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    description = models.CharField(max_length=255, blank=True)
    enabled = models.BooleanField(default=True)
    allowed_in = models.BooleanField(default=True, help_text="May open associations to Isthmus.")
    allowed_out = models.BooleanField(default=True, help_text="Isthmus may send to it.")
    allow_echo = models.BooleanField("C-ECHO", default=True)
    allow_store = models.BooleanField("C-STORE", default=True)
    allow_worklist = models.BooleanField("Worklist C-FIND", default=True)
    allow_mpps = models.BooleanField("MPPS", default=True)
    # Off for new nodes: a modality sends and asks for its worklist; reading the archive back is granted.
    allow_query_retrieve = models.BooleanField(
        "Query/Retrieve", default=False, help_text="C-FIND, C-MOVE and C-GET of stored studies."
    )
    allow_commitment = models.BooleanField("Storage commitment", default=True)
    last_seen_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_seen_address = models.CharField(max_length=64, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    last_error_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host or '*'}:{self.port})"

    def allows(self, service: str) -> bool:
        """True when this node may use `service` (one of SERVICES) with us."""
        return bool(getattr(self, f"allow_{service}"))


class AssociationEvent(models.Model):
    """One association request to our listener, accepted or rejected, and how it ended."""

    class Reason(models.TextChoices):
        ACCEPTED = "accepted", "Accepted"
        CALLED_AE = "called-ae-unknown", "Called AE title is not ours"
        CALLING_AE = "calling-ae-unknown", "Calling AE title is not a registered node"
        DISABLED = "node-disabled", "Node is disabled"
        NOT_ALLOWED_IN = "not-allowed-in", "Node is not allowed in"
        HOST_MISMATCH = "host-mismatch", "Connected from a host other than the node's"
        BUSY = "busy", "Too many associations"

    at = models.DateTimeField(db_index=True)
    accepted = models.BooleanField()
    reason = models.CharField(max_length=32, choices=Reason.choices)
    detail = models.CharField(max_length=255, blank=True)
    calling_ae = models.CharField("calling AE", max_length=16, db_index=True)
    called_ae = models.CharField("called AE", max_length=16)
    peer_address = models.CharField(max_length=64)
    peer_port = models.PositiveIntegerField(null=True)
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="association_events")
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, blank=True, help_text="released, aborted or rejected")
    requests = models.PositiveIntegerField(default=0, help_text="DIMSE requests served")

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["accepted", "at"])]

    def __str__(self) -> str:
        verdict = "accepted" if self.accepted else f"rejected ({self.reason})"
        return f"{self.calling_ae}@{self.peer_address} -> {self.called_ae}: {verdict}"


class Heartbeat(models.Model):
    """A running Isthmus process (dimse listener, worker) reporting it is alive."""

    kind = models.CharField(max_length=16)
    instance = models.CharField(max_length=128, help_text="host:pid")
    address = models.CharField(max_length=128, blank=True, help_text="where it listens, if it does")
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "instance"], name="heartbeat_kind_instance")]

    def __str__(self) -> str:
        return f"{self.kind} {self.instance}"


# --- The instance index: what C-STORE and STOW-RS fill, and Q/R, QIDO and WADO read. ---
# Attribute values are kept as DICOM strings (DA "YYYYMMDD", TM "HHMMSS.FFFFFF") so
# PS3.4 C.2.2.2 matching (ranges included) works as plain string comparisons in SQL.


class Patient(models.Model):
    patient_id = models.CharField(max_length=64, db_index=True)
    issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    patient_name = models.CharField(max_length=324, blank=True)
    patient_birth_date = models.CharField(max_length=8, blank=True)
    patient_sex = models.CharField(max_length=16, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["patient_id", "issuer_of_patient_id"], name="patient_id_issuer")]
        # "DOE*" is LIKE 'DOE%': a pattern opclass lets PostgreSQL range-scan it (SQLite ignores opclasses
        # and its GLOB uses the plain index). Migration 0003 adds UPPER(patient_name) for case-insensitive PN.
        indexes = [
            models.Index(fields=["patient_name"], name="patient_name_pattern", opclasses=["varchar_pattern_ops"])
        ]

    def __str__(self) -> str:
        return f"patient #{self.pk}"  # never the name or ID: this string reaches logs


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=64, unique=True)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    study_date = models.CharField(max_length=8, blank=True, db_index=True)
    study_time = models.CharField(max_length=16, blank=True)
    accession_number = models.CharField(max_length=16, blank=True, db_index=True)
    study_id = models.CharField(max_length=16, blank=True)
    study_description = models.CharField(max_length=64, blank=True)
    referring_physician_name = models.CharField(max_length=324, blank=True)
    specific_character_set = models.CharField(max_length=128, blank=True)
    calling_ae = models.CharField(max_length=16, blank=True, help_text="AE that sent the first instance")
    received_at = models.DateTimeField(db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return self.study_instance_uid


class Series(models.Model):
    series_instance_uid = models.CharField(max_length=64, unique=True)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    modality = models.CharField(max_length=16, blank=True, db_index=True)
    series_number = models.IntegerField(null=True, blank=True)
    series_description = models.CharField(max_length=64, blank=True)
    body_part_examined = models.CharField(max_length=16, blank=True)
    series_date = models.CharField(max_length=8, blank=True)
    series_time = models.CharField(max_length=16, blank=True)
    performed_procedure_step_start_date = models.CharField(max_length=8, blank=True)
    performed_procedure_step_start_time = models.CharField(max_length=16, blank=True)
    received_at = models.DateTimeField()

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return self.series_instance_uid


class Instance(models.Model):
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    sop_class_uid = models.CharField(max_length=64, db_index=True)
    instance_number = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    number_of_frames = models.IntegerField(null=True, blank=True)
    rows = models.IntegerField(null=True, blank=True)
    columns = models.IntegerField(null=True, blank=True)
    bits_allocated = models.IntegerField(null=True, blank=True)
    content_date = models.CharField(max_length=8, blank=True)
    content_time = models.CharField(max_length=16, blank=True)
    path = models.CharField(max_length=255, help_text="relative to the storage root")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    calling_ae = models.CharField(max_length=16, blank=True)
    called_ae = models.CharField(max_length=16, blank=True)
    source = models.CharField(max_length=16, default="dimse", help_text="dimse or stow")
    received_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.sop_instance_uid


class AuditEvent(models.Model):
    """Something an administrator may need to account for later: duplicates, rejections, deletions."""

    at = models.DateTimeField(db_index=True)
    action = models.CharField(max_length=48, db_index=True)
    actor = models.CharField(max_length=128, blank=True, help_text="AE title, user or process")
    target = models.CharField(max_length=128, blank=True, help_text="a UID, never patient data")
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.action} {self.target}"


class CommitmentRequest(models.Model):
    """A Storage Commitment N-ACTION (PS3.4 J.3) and the N-EVENT-REPORT owed for it."""

    class State(models.TextChoices):
        WAITING = "waiting", "Waiting for routing to deliver the instances"
        PENDING = "pending", "Report not yet delivered"
        DELIVERED = "delivered", "Report delivered"
        FAILED = "failed", "Gave up delivering the report"

    transaction_uid = models.CharField(max_length=64, db_index=True)
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="commitments")
    calling_ae = models.CharField(max_length=16)
    peer_address = models.CharField(max_length=64, blank=True)
    referenced = models.JSONField(help_text="[[SOP Class UID, SOP Instance UID], ...] asked for")
    success = models.JSONField(default=list, help_text="committed [[class, instance], ...]")
    failed = models.JSONField(default=list, help_text="[[class, instance, failure reason], ...]")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_error = models.TextField(blank=True)
    received_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return self.transaction_uid


# --- HL7 senders: who may send orders and demographics to the HL7 port (docs/security.md). ---

MESSAGE_TYPE_RE = re.compile(r"^[A-Z0-9]{3}\^[A-Z0-9]{3}$")


def validate_network(value: str) -> None:
    """An IPv4/IPv6 address or a CIDR network whose host bits are zero (10.1.2.0/24, not 10.1.2.3/24)."""
    try:
        ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValidationError("An IP address (10.1.2.3) or a network (10.1.2.0/24).") from None
        raise ValidationError(f"{value} has host bits set: the network is {network}.") from None


class Hl7Sender(models.Model):
    """A system (RIS, HIS, interface engine) allowed to send HL7 from an address or network."""

    name = models.SlugField(max_length=64, unique=True, help_text="Short unique name, used in config files.")
    host = models.CharField(
        max_length=64,
        validators=[validate_network],
        help_text="IP address or CIDR network (10.1.2.0/24) messages may come from.",
    )
    message_types = models.JSONField(
        default=list,
        blank=True,
        help_text="Allowed message types, e.g. ORM^O01, ADT^A08; blank allows every type Isthmus handles.",
    )
    description = models.CharField(max_length=255, blank=True)
    enabled = models.BooleanField(default=True)
    last_seen_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_seen_address = models.CharField(max_length=64, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "HL7 sender"

    def __str__(self) -> str:
        return f"{self.name} ({self.host})"

    def clean(self) -> None:
        """Message types as MSH-9 writes them (ORM^O01, upper case); the admin and import_config both call this."""
        types = self.message_types if self.message_types is not None else []
        if not isinstance(types, list) or not all(isinstance(item, str) for item in types):
            raise ValidationError({"message_types": "A list of message types such as [ORM^O01, ADT^A08]."})
        self.message_types = list(dict.fromkeys(item.strip().upper() for item in types if item.strip()))
        bad = [item for item in self.message_types if not MESSAGE_TYPE_RE.match(item)]
        if bad:
            raise ValidationError({"message_types": f"Not a message type (CODE^EVENT, e.g. ORM^O01): {', '.join(bad)}"})

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.host.strip(), strict=False)

    def covers(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        try:
            return ip in self.network
        except ValueError:  # a host written around validation covers nothing
            return False

    def allows(self, message_type: str) -> bool:
        return not self.message_types or message_type in self.message_types


class Hl7Refusal(models.Model):
    """HL7 messages refused for who sent them: one row per address and reason, counted (bounded by hosts)."""

    class Reason(models.TextChoices):
        UNKNOWN_SENDER = "unknown-sender", "No enabled HL7 sender covers the address"
        TYPE_NOT_ALLOWED = "type-not-allowed", "Message type not allowed for the sender"

    peer_address = models.CharField(max_length=64)
    reason = models.CharField(max_length=32, choices=Reason.choices)
    sender = models.ForeignKey(Hl7Sender, null=True, blank=True, on_delete=models.SET_NULL, related_name="refusals")
    message_type = models.CharField(max_length=16, blank=True, help_text="of the last refused message")
    control_id = models.CharField("control ID", max_length=64, blank=True, help_text="MSH-10 of the last one")
    count = models.PositiveIntegerField(default=0)
    first_at = models.DateTimeField()
    last_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-last_at"]
        verbose_name = "HL7 refusal"
        constraints = [models.UniqueConstraint(fields=["peer_address", "reason"], name="hl7_refusal_address_reason")]

    def __str__(self) -> str:
        return f"{self.peer_address}: {self.get_reason_display()}"
