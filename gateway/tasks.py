"""Housekeeping tasks run by the worker on beat's schedule (gateway/celery.py)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from gateway import commitment, hl7_senders, services

log = logging.getLogger("isthmus.tasks")


@shared_task(bind=True, ignore_result=True)
def worker_heartbeat(self) -> None:
    """Proves the whole chain (beat -> broker -> worker -> database) is moving."""
    services.beat(kind="worker", instance=self.request.hostname or services.process_instance())


@shared_task(ignore_result=True)
def prune_association_events() -> int:
    deleted = services.prune_association_events(older_than_days=settings.EVENT_RETENTION_DAYS)
    if deleted:
        log.info("pruned %d association events older than %d days", deleted, settings.EVENT_RETENTION_DAYS)
    refusals = hl7_senders.prune_refusals(older_than_days=settings.EVENT_RETENTION_DAYS)
    if refusals:
        log.info("pruned %d HL7 refusal rows older than %d days", refusals, settings.EVENT_RETENTION_DAYS)
    return deleted


# --- Storage commitment reports (gateway/commitment.py holds the logic) ---


@shared_task(ignore_result=True, acks_late=True)
def deliver_commitment_report(commitment_id: int) -> None:
    """One attempt to send a commitment report on a new association; idempotent."""
    commitment.deliver(commitment_id=commitment_id)


@shared_task(ignore_result=True)
def sweep_commitment_reports() -> int:
    """Re-ring every due report: the row is the truth, so a lost message or a Redis restart loses nothing."""
    commitment.release_waiting()  # "delivered" policy: requests whose instances routing has now delivered
    due = commitment.claim_due()
    for commitment_id in due:
        deliver_commitment_report.delay(commitment_id)
    return len(due)
