"""Routing tasks run by the worker (Celery autodiscovers this module). Thin: the work is in services."""

from __future__ import annotations

from celery import shared_task


@shared_task(ignore_result=True, acks_late=True)
def deliver(destination_id: int, study_uid: str) -> int:
    """Deliver one batch of a study to a destination (rung on commit, by the sweep, and after each batch)."""
    from routing import services

    return services.deliver(destination_id, study_uid)


@shared_task(ignore_result=True, acks_late=True)
def sweep_forward_jobs() -> int:
    """Beat: re-ring every due job whose lease ran out, so a lost message or a dead worker loses nothing."""
    from routing import services

    return services.sweep()
