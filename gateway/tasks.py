"""Housekeeping tasks run by the worker on beat's schedule (gateway/celery.py)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from gateway import services

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
    return deleted
