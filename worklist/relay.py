"""MPPS relay: deliver the outbox rows (MppsRelay) to downstream MPPS SCPs, with retries.

The row is the truth and a Celery message only a doorbell; a periodic sweep
claims due rows, so a lost message or a broker restart loses nothing. Rows of
one performed step go to one node in order: an N-SET never overtakes its N-CREATE.
"""

from __future__ import annotations

import logging
import random
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone
from pydicom.dataset import Dataset
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from gateway import services
from gateway.dimse import outgoing
from worklist.models import MppsRelay

log = logging.getLogger("isthmus.mpps")

State = MppsRelay.State

# 10 s, 20 s, 40 s ... capped at one hour, 25 % jitter; give up after MAX_ATTEMPTS.
RETRY_BASE_SECONDS = 10.0
RETRY_CAP_SECONDS = 3600.0
MAX_ATTEMPTS = 30
# While an attempt is under way its row is not due; a worker that dies mid-attempt leaves it to the sweep.
LEASE = timedelta(seconds=120)
CLAIM_BATCH = 100
# PS3.4 F.7.2: answers that mean the downstream SCP already has what a resend carries.
ALREADY_THERE = {("create", 0x0111)}


class RelayError(Exception):
    """A relay attempt failed; permanent ones (the peer refused the content) are not retried."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def ring(*, performed_step_id: int) -> None:
    """After commit, ask a worker to deliver now; if the broker is down the sweep delivers."""
    from worklist.tasks import deliver_mpps_relays

    def send() -> None:
        try:
            deliver_mpps_relays.delay()
        except Exception as exc:
            log.warning(
                "MPPS relay for performed step %s not queued (%s); the sweep will deliver it", performed_step_id, exc
            )

    transaction.on_commit(send)


def due_rows():
    """Pending rows whose time has come and that no earlier unsent row of the same step and node holds back."""
    earlier = MppsRelay.objects.filter(
        performed_step=OuterRef("performed_step"), destination=OuterRef("destination"), pk__lt=OuterRef("pk")
    ).exclude(state=State.SENT)
    return (
        MppsRelay.objects.filter(state=State.PENDING, next_attempt_at__lte=timezone.now())
        .exclude(Exists(earlier))
        .order_by("pk")
    )


def claim_due(*, limit: int = CLAIM_BATCH) -> list[int]:
    """Lease due rows so that a concurrent worker passes them by."""
    now = timezone.now()
    with transaction.atomic():
        due = due_rows()
        if connection.features.has_select_for_update_skip_locked:  # PostgreSQL; SQLite has one writer anyway
            due = due.select_for_update(skip_locked=True, of=("self",))
        ids = list(due.values_list("pk", flat=True)[:limit])
        MppsRelay.objects.filter(pk__in=ids).update(next_attempt_at=now + LEASE)
    return ids


MAX_ROUNDS = 20


def deliver_due() -> int:
    """Claim and deliver due rows until none is left (an N-SET becomes due once its N-CREATE is sent)."""
    delivered = 0
    for _ in range(MAX_ROUNDS):  # every claimed row is leased or done, so each round claims new rows
        ids = claim_due()
        if not ids:
            break
        delivered += sum(1 for relay_id in ids if deliver(relay_id=relay_id).state == State.SENT)
    return delivered


def deliver(*, relay_id: int) -> MppsRelay:
    """One attempt for one row: send it, then record the outcome."""
    relay = MppsRelay.objects.select_related("destination", "performed_step").get(pk=relay_id)
    relay.attempts += 1
    MppsRelay.objects.filter(pk=relay.pk).update(attempts=relay.attempts)
    try:
        send(relay)
    except RelayError as error:
        return _failed(relay, error)
    MppsRelay.objects.filter(pk=relay.pk).update(
        state=State.SENT, sent_at=timezone.now(), next_attempt_at=None, last_error=""
    )
    log.info(
        "MPPS %s %s relayed to %s",
        relay.performed_step.sop_instance_uid,
        relay.operation,
        relay.destination.name,
    )
    relay.refresh_from_db()
    return relay


def _failed(relay: MppsRelay, error: RelayError) -> MppsRelay:
    message = str(error)[:1000]
    if error.permanent or relay.attempts >= MAX_ATTEMPTS:
        fields = {"state": State.FAILED, "next_attempt_at": None, "last_error": message}
        log.error("MPPS relay %s to %s given up: %s", relay.pk, relay.destination.name, message)
    else:
        fields = {"next_attempt_at": timezone.now() + retry_delay(relay.attempts), "last_error": message}
        log.warning(
            "MPPS relay %s to %s attempt %d failed: %s", relay.pk, relay.destination.name, relay.attempts, message
        )
    MppsRelay.objects.filter(pk=relay.pk, state=State.PENDING).update(**fields)
    services.record_node_error(node=relay.destination, error=f"MPPS relay: {message}"[:1000])
    relay.refresh_from_db()
    return relay


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff with jitter after the `attempts`-th failed attempt."""
    seconds = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1))
    return timedelta(seconds=seconds * random.uniform(0.75, 1.0))


def send(relay: MppsRelay) -> None:
    """Open an association to the destination and send the row's N-CREATE or N-SET; raise RelayError."""
    from django.conf import settings

    node = relay.destination
    if not (node.enabled and node.allowed_out and node.host):
        raise RelayError(f"node {node.name} is disabled, not allowed out or has no host", permanent=True)
    dataset = Dataset.from_json(relay.attributes)
    if "SpecificCharacterSet" not in dataset:
        dataset.SpecificCharacterSet = "ISO_IR 192"  # the values are Unicode; say how they are written
    where = f"{node.ae_title}@{node.host}:{node.port}"
    try:
        assoc = outgoing.associate(
            host=node.host,
            port=node.port,
            ae_title=node.ae_title,
            abstract_syntaxes=[ModalityPerformedProcedureStep],
            timeout=settings.DIMSE_TIMEOUT,
        )
    except outgoing.NotAssociated as exc:
        raise RelayError(str(exc)) from exc
    uid = relay.performed_step.sop_instance_uid
    try:
        if relay.operation == "create":
            status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, uid)
        else:
            status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, uid)
    except (RuntimeError, ValueError) as exc:  # no accepted context, encoding failure
        raise RelayError(f"{where}: {exc}", permanent=True) from exc
    finally:
        if assoc.is_established:
            assoc.release()
    _check_status(relay.operation, status, where)


def _check_status(operation: str, status: Dataset, where: str) -> None:
    if not status or "Status" not in status:
        raise RelayError(f"no N-{operation.upper()} response from {where}")
    code = int(status.Status)
    if code == 0x0000 or (code & 0xF000) == 0xB000 or (operation, code) in ALREADY_THERE:
        return
    raise RelayError(f"{where} answered N-{operation.upper()} with 0x{code:04X}", permanent=(code & 0xF000) != 0xA000)
