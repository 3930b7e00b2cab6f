"""Storage Commitment Push Model, SCP side (PS3.4 Annex J): record, evaluate, report, retry.

The CommitmentRequest row is the truth; a Celery message is only a doorbell.
A report that cannot go out on the requester's association goes out on a new
association to the requester's registered node, retried with backoff until it
is delivered or gives up (FAILED, visible in the admin, re-drivable).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from datetime import timedelta
from enum import IntEnum

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pynetdicom import build_role
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from gateway import services
from gateway.dimse import outgoing
from gateway.models import CommitmentRequest, Instance, Node
from gateway.store import instance_path
from routing.models import ForwardJob

log = logging.getLogger("isthmus.commitment")

State = CommitmentRequest.State

# PS3.4 J.3.2.1.1: Action Type ID 1, "Request Storage Commitment".
REQUEST_STORAGE_COMMITMENT = 1
# Most references one request may carry: bounds the row and the report we build.
MAX_REFERENCES = 10_000

# Retry schedule for reports on a new association: 10 s, 20 s, 40 s ... capped at
# one hour, 25 % jitter; give up after MAX_ATTEMPTS attempts or MAX_AGE, whichever first.
RETRY_BASE_SECONDS = 10.0
RETRY_CAP_SECONDS = 3600.0
MAX_ATTEMPTS = 30
MAX_AGE = timedelta(hours=24)
# While an attempt is under way its row is not due; a process that dies mid-attempt
# leaves the row to the sweeper once this lease runs out.
LEASE = timedelta(seconds=120)
CLAIM_BATCH = 100
# How often a request WAITING for routing (policy "delivered") is looked at again.
WAIT_POLL = timedelta(seconds=10)


class EventType(IntEnum):
    """PS3.4 J.3.3.1: Event Type ID of the N-EVENT-REPORT."""

    SUCCESS = 1  # Storage Commitment Request Successful
    FAILURES_EXIST = 2  # Storage Commitment Request Complete - Failures Exist


class FailureReason(IntEnum):
    """PS3.4 J.3.3.1: Failure Reason (0008,1197) of a Failed SOP Sequence item."""

    PROCESSING_FAILURE = 0x0110  # indexed, but the file is not there
    NO_SUCH_OBJECT_INSTANCE = 0x0112  # never received
    CLASS_INSTANCE_CONFLICT = 0x0119  # received under another SOP Class


class InvalidRequest(ValueError):
    """The N-ACTION's Action Information is unusable; the message says why (UIDs only)."""


class DeliveryError(Exception):
    """A report did not reach the requester. Permanent ones are not retried."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# --- The request ---------------------------------------------------------------


def parse_action_information(info: Dataset | None) -> tuple[str, list[list[str]]]:
    """Transaction UID and [[SOP Class UID, SOP Instance UID], ...] of a PS3.4 J.3.2.1.1 request."""
    if info is None:
        raise InvalidRequest("no Action Information")
    transaction_uid = _uid(info.get("TransactionUID"))
    if not transaction_uid:
        raise InvalidRequest("Transaction UID (0008,1195) missing or not a valid UID")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise InvalidRequest("Referenced SOP Sequence (0008,1199) missing or empty")
    if len(items) > MAX_REFERENCES:
        raise InvalidRequest(f"{len(items)} references, more than the {MAX_REFERENCES} accepted")
    referenced = []
    for number, item in enumerate(items, 1):
        sop_class, sop_instance = _uid(item.get("ReferencedSOPClassUID")), _uid(item.get("ReferencedSOPInstanceUID"))
        if not sop_class or not sop_instance:
            raise InvalidRequest(f"Referenced SOP Sequence item {number} lacks a valid SOP Class or Instance UID")
        referenced.append([sop_class, sop_instance])
    return transaction_uid, referenced


def _uid(value) -> str:
    """A valid UID as a string, or "" (also for multi-valued or non-text values)."""
    if not isinstance(value, str):
        return ""
    value = value.strip("\0 ")
    return value if value and len(value) <= 64 and UID(value).is_valid else ""


def record_request(
    *, transaction_uid: str, referenced: list[list[str]], node: Node | None, calling_ae: str, peer_address: str
) -> CommitmentRequest:
    """Write the request with its outcome already evaluated, so every delivery sends the same report.

    Under the "delivered" policy, while routing still owes some referenced
    instance to a destination, the row WAITs (no report yet) and the sweep
    evaluates it once the jobs are settled (release_waiting()).
    """
    now = timezone.now()
    if settings.COMMITMENT_POLICY == "delivered" and _awaiting_delivery(sop for _, sop in referenced):
        success, failed, state, due = [], [], State.WAITING, now + WAIT_POLL
    else:
        # Not due until the N-ACTION response is out; if the doorbell after it is
        # lost (process died, broker down), the sweeper finds the row then.
        (success, failed), state, due = evaluate(referenced), State.PENDING, now + LEASE
    return CommitmentRequest.objects.create(
        transaction_uid=transaction_uid,
        node=node,
        calling_ae=calling_ae[:16],
        peer_address=peer_address[:64],
        referenced=referenced,
        success=success,
        failed=failed,
        state=state,
        next_attempt_at=due,
        received_at=now,
    )


def release_waiting(*, limit: int = CLAIM_BATCH) -> list[int]:
    """Evaluate WAITING requests whose deliveries are settled (or that waited MAX_AGE); ids now due to report."""
    now = timezone.now()
    released = []
    for waiting in CommitmentRequest.objects.filter(state=State.WAITING, next_attempt_at__lte=now)[:limit]:
        references = waiting.referenced
        if now - waiting.received_at < MAX_AGE and _awaiting_delivery(sop for _, sop in references):
            CommitmentRequest.objects.filter(pk=waiting.pk, state=State.WAITING).update(next_attempt_at=now + WAIT_POLL)
            continue
        success, failed = evaluate(references)  # still queued after MAX_AGE: reported as failed
        if CommitmentRequest.objects.filter(pk=waiting.pk, state=State.WAITING).update(
            state=State.PENDING, success=success, failed=failed, next_attempt_at=now
        ):
            released.append(waiting.pk)
    return released


# --- What "committed" means ---------------------------------------------------------


def evaluate(referenced: list[list[str]]) -> tuple[list[list[str]], list[list]]:
    """Split references into committed [[class, instance]] and failed [[class, instance, reason]]."""
    stored = _stored_instances(sop_instance for _, sop_instance in referenced)
    undelivered = _undelivered(stored.values()) if settings.COMMITMENT_POLICY == "delivered" else set()
    success, failed = [], []
    for sop_class, sop_instance in referenced:
        found = stored.get(sop_instance)
        if found is None:
            failed.append([sop_class, sop_instance, FailureReason.NO_SUCH_OBJECT_INSTANCE])
        elif sop_instance in undelivered:
            failed.append([sop_class, sop_instance, FailureReason.PROCESSING_FAILURE])
        elif found.sop_class_uid != sop_class:
            failed.append([sop_class, sop_instance, FailureReason.CLASS_INSTANCE_CONFLICT])
        elif not _file_exists(found):
            log.error("commitment: instance %s is indexed but its file is missing", sop_instance)
            failed.append([sop_class, sop_instance, FailureReason.PROCESSING_FAILURE])
        else:
            success.append([sop_class, sop_instance])
    return success, [[c, i, int(r)] for c, i, r in failed]


def _stored_instances(sop_instance_uids: Iterable[str]) -> dict[str, Instance]:
    """Index rows for these UIDs, in chunks that stay under every database's parameter limit."""
    uids = list(dict.fromkeys(sop_instance_uids))
    found: dict[str, Instance] = {}
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        for instance in Instance.objects.filter(sop_instance_uid__in=chunk).only(
            "sop_instance_uid", "sop_class_uid", "path"
        ):
            found[instance.sop_instance_uid] = instance
    return found


def _file_exists(instance: Instance) -> bool:
    try:
        return instance_path(instance).is_file()
    except (ValueError, OSError):  # a path outside the storage root is no file of ours
        return False


def _undelivered(instances: Iterable[Instance]) -> set[str]:
    """SOP Instance UIDs of these instances that some destination has not acknowledged (pending, dead, cancelled).

    An instance no rule routed anywhere has nothing to deliver: stored is committed.
    """
    ids = {instance.pk: instance.sop_instance_uid for instance in instances}
    keys = list(ids)
    missing: set[str] = set()
    for start in range(0, len(keys), 500):
        jobs = ForwardJob.objects.filter(instance_id__in=keys[start : start + 500]).exclude(
            state=ForwardJob.State.DELIVERED
        )
        missing.update(ids[instance_id] for instance_id in jobs.values_list("instance_id", flat=True))
    return missing


def _awaiting_delivery(sop_instance_uids: Iterable[str]) -> bool:
    """True while routing still owes one of these instances to a destination (a job pending)."""
    uids = list(dict.fromkeys(sop_instance_uids))
    return any(
        ForwardJob.objects.filter(
            instance__sop_instance_uid__in=uids[start : start + 500], state=ForwardJob.State.PENDING
        ).exists()
        for start in range(0, len(uids), 500)
    )


# --- The report --------------------------------------------------------------------


def event_report(commitment: CommitmentRequest) -> tuple[EventType, Dataset]:
    """Event Type ID and Event Information of the N-EVENT-REPORT (PS3.4 J.3.3.1)."""
    info = Dataset()
    info.TransactionUID = commitment.transaction_uid
    if commitment.success:
        info.ReferencedSOPSequence = Sequence([_item(c, i) for c, i in commitment.success])
    if not commitment.failed:
        return EventType.SUCCESS, info
    failed_items = []
    for sop_class, sop_instance, reason in commitment.failed:
        item = _item(sop_class, sop_instance)
        item.FailureReason = int(reason)
        failed_items.append(item)
    info.FailedSOPSequence = Sequence(failed_items)
    return EventType.FAILURES_EXIST, info


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def check_report_status(status: Dataset | None) -> None:
    """Raise DeliveryError unless the requester answered the N-EVENT-REPORT with success."""
    if not status or "Status" not in status:
        raise DeliveryError("no N-EVENT-REPORT response (timeout, abort or invalid answer)")
    if int(status.Status) != 0x0000:
        raise DeliveryError(f"N-EVENT-REPORT answered with status 0x{int(status.Status):04X}")


# --- Attempts and their outcome ----------------------------------------------------------


def begin_attempt(*, commitment_id: int) -> CommitmentRequest | None:
    """Claim one delivery attempt; None when the row is settled or another process holds it.

    `attempts` is the version: the conditional update lets exactly one
    concurrent claimant through.
    """
    commitment = CommitmentRequest.objects.filter(pk=commitment_id).first()
    if commitment is None or commitment.state != State.PENDING:
        return None
    claimed = CommitmentRequest.objects.filter(
        pk=commitment_id, state=State.PENDING, attempts=commitment.attempts
    ).update(attempts=F("attempts") + 1, next_attempt_at=timezone.now() + LEASE)
    if not claimed:
        return None
    commitment.refresh_from_db()
    return commitment


def finish_attempt(
    commitment: CommitmentRequest, *, error: DeliveryError | None, via: str, retry_at=None
) -> CommitmentRequest:
    """Record how a claimed attempt ended: delivered, rescheduled with backoff, or given up."""
    now = timezone.now()
    fields: dict = {}
    if error is None:
        fields = {"state": State.DELIVERED, "delivered_at": now, "next_attempt_at": None}
        log.info(
            "commitment report %s delivered %s to %s (%d committed, %d failed)",
            commitment.transaction_uid, via, commitment.calling_ae, len(commitment.success), len(commitment.failed),
        )  # fmt: skip
    else:
        message = f"{via}: {error}"[:1000]
        gives_up = error.permanent or commitment.attempts >= MAX_ATTEMPTS or now - commitment.received_at >= MAX_AGE
        if gives_up:
            fields = {"state": State.FAILED, "next_attempt_at": None, "last_error": message}
            log.error("commitment report %s given up after %d attempts: %s",
                      commitment.transaction_uid, commitment.attempts, message)  # fmt: skip
        else:
            fields = {"next_attempt_at": retry_at or now + retry_delay(commitment.attempts), "last_error": message}
            log.warning("commitment report %s attempt %d failed: %s",
                        commitment.transaction_uid, commitment.attempts, message)  # fmt: skip
    CommitmentRequest.objects.filter(pk=commitment.pk, state=State.PENDING, attempts=commitment.attempts).update(
        **fields
    )
    commitment.refresh_from_db()
    return commitment


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff with jitter after the `attempts`-th failed attempt."""
    seconds = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1))
    return timedelta(seconds=seconds * random.uniform(0.75, 1.0))


# --- Delivery on a new association -----------------------------------------------------------


def deliver(*, commitment_id: int) -> CommitmentRequest | None:
    """One attempt to send the report on a new association to the requester's node."""
    commitment = begin_attempt(commitment_id=commitment_id)
    if commitment is None:
        return None
    node = None
    try:
        node = report_destination(commitment)
        host = node.host or commitment.peer_address
        event_type, info = event_report(commitment)
        send_report(host=host, port=node.port, ae_title=node.ae_title, event_type=event_type, info=info)
    except DeliveryError as error:
        if node is not None:
            services.record_node_error(node=node, error=f"Storage commitment report: {error}"[:1000])
        return finish_attempt(commitment, error=error, via="on a new association")
    return finish_attempt(commitment, error=None, via="on a new association")


def report_destination(commitment: CommitmentRequest) -> Node:
    """The registered node the report goes to: it must be enabled, allowed out and allowed commitment."""
    node = commitment.node or Node.objects.filter(ae_title=commitment.calling_ae, enabled=True).first()
    if node is None:
        raise DeliveryError(f"{commitment.calling_ae} is not a registered node", permanent=True)
    node.refresh_from_db()
    if not (node.enabled and node.allowed_out and node.allow_commitment):
        raise DeliveryError(f"node {node.name} is disabled, not allowed out or not allowed commitment", permanent=True)
    if not node.host and not commitment.peer_address:
        raise DeliveryError(f"node {node.name} has no host", permanent=True)
    return node


def send_report(*, host: str, port: int, ae_title: str, event_type: int, info: Dataset) -> None:
    """Open an association as Storage Commitment SCP and send one N-EVENT-REPORT; raise DeliveryError."""
    # PS3.4 J.3.3.1.2 note 1: the requester defaults to the SCU role, so we propose the SCP role.
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    try:
        assoc = outgoing.associate(
            host=host,
            port=port,
            ae_title=ae_title,
            abstract_syntaxes=[StorageCommitmentPushModel],
            timeout=settings.DIMSE_TIMEOUT,
            ext_neg=[role],
        )
    except outgoing.NotAssociated as exc:
        raise DeliveryError(str(exc)) from exc
    try:
        status, _ = assoc.send_n_event_report(
            info, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        check_report_status(status)
    except (RuntimeError, ValueError) as exc:  # no accepted context, encoding failure
        raise DeliveryError(str(exc)) from exc
    finally:
        if assoc.is_established:
            assoc.release()


# --- Doorbells and the sweeper ------------------------------------------------------------------


def ring(*, commitment_id: int) -> None:
    """Ask a worker to deliver now; if the broker is down the sweeper delivers once the lease ends."""
    from gateway.tasks import deliver_commitment_report

    def send() -> None:
        try:
            deliver_commitment_report.delay(commitment_id)
        except Exception as exc:  # broker down: make the row due so the next sweep takes it
            log.warning("commitment report %s not queued (%s); the sweeper will deliver it", commitment_id, exc)
            CommitmentRequest.objects.filter(pk=commitment_id, state=State.PENDING).update(
                next_attempt_at=timezone.now()
            )

    transaction.on_commit(send)


def claim_due(*, limit: int = CLAIM_BATCH) -> list[int]:
    """Pending rows whose time has come, leased so that a concurrent sweeper passes them by."""
    now = timezone.now()
    with transaction.atomic():
        due = CommitmentRequest.objects.filter(state=State.PENDING, next_attempt_at__lte=now).order_by(
            "next_attempt_at"
        )
        if connection.features.has_select_for_update_skip_locked:  # PostgreSQL; SQLite has one writer anyway
            due = due.select_for_update(skip_locked=True)
        ids = list(due.values_list("pk", flat=True)[:limit])
        CommitmentRequest.objects.filter(pk__in=ids).update(next_attempt_at=now + LEASE)
    return ids


def retry_now(*, commitment_ids: Iterable[int]) -> int:
    """Admin "retry now": pending or failed reports get one more attempt at once."""
    ids = list(commitment_ids)
    with transaction.atomic():
        count = CommitmentRequest.objects.filter(pk__in=ids, state__in=[State.PENDING, State.FAILED]).update(
            state=State.PENDING, next_attempt_at=timezone.now()
        )
        for commitment_id in CommitmentRequest.objects.filter(pk__in=ids, state=State.PENDING).values_list(
            "pk", flat=True
        ):
            ring(commitment_id=commitment_id)
    return count
