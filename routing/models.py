"""Where instances go: destinations, the rules that pick them, and the forward jobs (the outbox).

The ForwardJob row is the truth and the broker only a doorbell: jobs are
written in the index transaction of store.save(), enqueued on commit, and a
beat sweep re-enqueues any due job whose lease ran out, so losing Redis or a
worker loses nothing.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from gateway.encryption import EncryptedField
from gateway.models import Instance, Node


class Destination(models.Model):
    """A place instances are delivered to: a DIMSE node (C-STORE) or a DICOMweb service (STOW-RS)."""

    SECRETS = ("password", "token", "oauth_client_secret")

    class Kind(models.TextChoices):
        DIMSE = "dimse", "DIMSE C-STORE"
        DICOMWEB = "dicomweb", "DICOMweb STOW-RS"

    class Auth(models.TextChoices):
        NONE = "none", "None"
        BASIC = "basic", "HTTP basic"
        BEARER = "bearer", "Static bearer token"
        OAUTH2 = "oauth2", "OAuth2 client credentials"

    name = models.SlugField(max_length=64, unique=True, help_text="Short unique name, used in config files.")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.CharField(max_length=255, blank=True)
    enabled = models.BooleanField(default=True, help_text="Rules select only enabled destinations.")
    paused = models.BooleanField(default=False, help_text="Jobs are kept and queued but not delivered.")

    # DIMSE
    node = models.ForeignKey(
        Node, null=True, blank=True, on_delete=models.PROTECT, related_name="destinations", help_text="DIMSE only."
    )
    # DICOMweb
    url = models.URLField(max_length=500, blank=True, help_text="DICOMweb base URL (STOW-RS posts to URL/studies).")
    auth = models.CharField(max_length=16, choices=Auth.choices, default=Auth.NONE)
    username = models.CharField(max_length=255, blank=True)
    # Secrets: encrypted in the database (gateway/encryption.py), never shown again by the admin or an export.
    password = EncryptedField(max_length=255, blank=True, help_text="HTTP basic password.")
    token = EncryptedField(max_length=2000, blank=True, help_text="Static bearer token.")
    oauth_token_url = models.URLField(max_length=500, blank=True)
    oauth_client_id = models.CharField(max_length=255, blank=True)
    oauth_client_secret = EncryptedField(max_length=255, blank=True)
    oauth_scope = models.CharField(max_length=255, blank=True)
    verify_tls = models.BooleanField(default=True)
    ca_bundle = models.CharField(max_length=500, blank=True, help_text="Path to a CA bundle; blank uses the system's.")
    connect_timeout = models.FloatField(default=10.0, validators=[MinValueValidator(0.1)], help_text="seconds")
    read_timeout = models.FloatField(default=120.0, validators=[MinValueValidator(0.1)], help_text="seconds")

    # Flow control
    max_concurrency = models.PositiveIntegerField(default=2, validators=[MinValueValidator(1)])
    rate_instances = models.FloatField(null=True, blank=True, help_text="Instances per second; blank: no limit.")
    rate_mbytes = models.FloatField(null=True, blank=True, help_text="MB per second; blank: no limit.")
    batch_size = models.PositiveIntegerField(
        default=50, validators=[MinValueValidator(1)], help_text="Instances per association or STOW-RS request."
    )

    # Retry policy
    retry_attempts = models.PositiveIntegerField(default=20, validators=[MinValueValidator(1)])
    retry_first_delay = models.FloatField(default=5.0, help_text="seconds before the first retry")
    retry_multiplier = models.FloatField(default=2.0, validators=[MinValueValidator(1.0)])
    retry_max_delay = models.FloatField(default=600.0, help_text="seconds; the longest wait between attempts")
    retry_max_age = models.FloatField(default=7 * 86400.0, help_text="seconds; older undelivered jobs go dead")

    last_error = models.TextField(blank=True, editable=False)
    last_error_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.kind == self.Kind.DIMSE and self.node_id is None:
            raise ValidationError({"node": "A DIMSE destination needs a node."})
        if self.kind == self.Kind.DICOMWEB and not self.url:
            raise ValidationError({"url": "A DICOMweb destination needs a base URL."})


class Rule(models.Model):
    """Ordered routing rule: when every condition matches an instance, it goes to the rule's destinations."""

    name = models.SlugField(max_length=64, unique=True)
    order = models.IntegerField(default=100, db_index=True, help_text="Lower runs first.")
    enabled = models.BooleanField(default=True)
    is_default = models.BooleanField(
        "default rule", default=False, help_text="Applies only when no other rule matched the instance."
    )
    stop = models.BooleanField("stop after this rule", default=False, help_text="Later rules are not evaluated.")
    conditions = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"Modality": "CT", "CallingAE": "CT*", "StudyDescription": "re:(?i)chest"}: all must match.',
    )
    destinations = models.ManyToManyField(Destination, related_name="rules")
    description = models.CharField(max_length=255, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return self.name


class ForwardJob(models.Model):
    """One instance owed to one destination."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        DEAD = "dead", "Dead letter"
        CANCELLED = "cancelled", "Cancelled"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="forward_jobs")
    # PROTECT: a destination that still owes instances is never deleted from under its jobs
    # (routing/destinations.py deletes the finished ones first and says what blocks).
    destination = models.ForeignKey(Destination, on_delete=models.PROTECT, related_name="jobs")
    rule = models.ForeignKey(Rule, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    study_instance_uid = models.CharField(max_length=64, help_text="Batches are per study and destination.")
    size = models.BigIntegerField(default=0, help_text="bytes, for the MB/s limit")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    lease_until = models.DateTimeField(null=True, blank=True, help_text="Claimed by a worker until then.")
    batch = models.CharField(
        max_length=32, blank=True, default="", help_text="The delivery holding the lease; blank while only queued."
    )
    created_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["destination", "state", "next_attempt_at"], name="job_due"),
            models.Index(fields=["state", "next_attempt_at"], name="job_sweep"),
            models.Index(fields=["destination", "study_instance_uid", "state"], name="job_batch"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id} -> {self.destination_id} ({self.state})"


class DeliveryAttempt(models.Model):
    """One try at delivering one job: what the operators' view counts and what a dead letter explains."""

    class Outcome(models.TextChoices):
        DELIVERED = "delivered", "Delivered"
        RETRY = "retry", "Failed, will retry"
        DEAD = "dead", "Failed permanently"

    job = models.ForeignKey(ForwardJob, on_delete=models.CASCADE, related_name="attempts_log")
    destination = models.ForeignKey(Destination, on_delete=models.CASCADE, related_name="attempts")
    at = models.DateTimeField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    status = models.CharField(max_length=16, blank=True, help_text="DICOM status (0x....) or HTTP code")
    error = models.TextField(blank=True)
    seconds = models.FloatField(default=0.0, help_text="time from batch start to this result")

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["destination", "at", "outcome"], name="attempt_window")]

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.outcome}"
