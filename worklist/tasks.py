"""Worklist tasks run by the worker (Celery autodiscovers this module)."""

from __future__ import annotations

from celery import shared_task


@shared_task(ignore_result=True, acks_late=True)
def deliver_mpps_relays() -> int:
    """Deliver every due MPPS relay row (beat rings this; so does each new MPPS after commit)."""
    from worklist import relay

    return relay.deliver_due()
