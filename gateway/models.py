"""Remote DICOM nodes, the associations they open, and process heartbeats."""

from __future__ import annotations

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
    allow_query_retrieve = models.BooleanField("Query/Retrieve", default=True)
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
