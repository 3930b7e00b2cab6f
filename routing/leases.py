"""Delivery leases: how long a delivery holds its jobs, and the heartbeat that keeps holding them while it sends.

A delivery claims jobs under a batch token and a lease (services.claim_batch);
once the lease has run out, the sweep rings the jobs again and another worker
may take them. A send of one large instance over a slow link can outlast the
lease, so a heartbeat renews it while the send runs, and never after it ran out.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from routing.models import ForwardJob

log = logging.getLogger("isthmus.routing")


def lease() -> timedelta:
    """How long a claim holds its jobs (ISTHMUS_ROUTING_LEASE_SECONDS)."""
    return timedelta(seconds=settings.ROUTING_LEASE_SECONDS)


def renew_lease(token: str) -> int:
    """Extend the lease of the jobs this delivery still holds: its token, and a lease not yet run out.

    A delivery that stalled past its lease must not extend it: another delivery
    may have taken the jobs (a new token), or the sweep has re-rung them (a blank one).
    """
    now = timezone.now()
    held = ForwardJob.objects.filter(batch=token, state=ForwardJob.State.PENDING, lease_until__gt=now)
    return held.update(lease_until=now + lease())


class LeaseHeartbeat:
    """Renews a claim's lease every lease/3 while its send runs, so a send longer than the lease is not taken over.

    A thread with its own database connection: one instance may take minutes on
    the wire, with no result to record (and so no renewal) until it is acknowledged.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{token[:8]}", daemon=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        """Renew at once (the claim's own lease may be partly spent on a loaded host), then every lease/3."""
        try:
            while True:
                try:
                    if not renew_lease(self.token):
                        return  # every job recorded, or the lease lost: nothing of ours to keep
                except DatabaseError as exc:  # the next beat tries again; the lease has two more periods
                    log.warning("lease of batch %s not renewed: %s", self.token, type(exc).__name__)
                if self._stop.wait(settings.ROUTING_LEASE_SECONDS / 3):
                    return
        finally:
            connection.close()
