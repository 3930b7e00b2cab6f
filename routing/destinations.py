"""Deleting a destination: never while it owes instances (pending, retrying or dead forward jobs).

The admin and import_config call these; the forward job's PROTECT foreign key
refuses any other path. Delivered and cancelled jobs go with the destination.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction
from django.db.models import Count, ProtectedError

from routing.models import DeliveryAttempt, Destination, ForwardJob

State = ForwardJob.State

OWED = (State.PENDING, State.DEAD)  # a retrying job is pending with attempts > 0
FINISHED = (State.DELIVERED, State.CANCELLED)


class DestinationInUse(Exception):
    """A destination that still owes instances cannot be deleted: its pending, retrying or dead jobs would be lost."""

    def __init__(self, name: str, pending: int, dead: int) -> None:
        self.name, self.pending, self.dead = name, pending, dead
        super().__init__(
            f"destination {name!r} cannot be deleted: {pending + dead} undelivered forward job(s)"
            f" ({pending} pending or retrying, {dead} dead); cancel them or let them be delivered first"
        )


def owed_jobs(destination_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """(pending, dead) job counts of those destinations that still owe instances, in one query."""
    rows = (
        ForwardJob.objects.filter(destination_id__in=list(destination_ids), state__in=OWED)
        .values_list("destination_id", "state")
        .annotate(count=Count("pk"))
        .order_by()
    )
    owed: dict[int, tuple[int, int]] = {}
    for destination_id, state, count in rows:
        pending, dead = owed.get(destination_id, (0, 0))
        owed[destination_id] = (pending + count, dead) if state == State.PENDING else (pending, dead + count)
    return owed


def finished_jobs(destination_ids: Iterable[int]) -> int:
    """Delivered and cancelled jobs of those destinations: what goes with them."""
    return ForwardJob.objects.filter(destination_id__in=list(destination_ids), state__in=FINISHED).count()


def delete_destination(destination: Destination) -> int:
    """Delete a destination that owes nothing, with its delivered and cancelled jobs; returns how many jobs went.

    Finished jobs go with it rather than being kept without one: they describe
    deliveries to a place that no longer exists, and the instances stay stored.
    Raises DestinationInUse while a job is pending, retrying or dead; the
    foreign key's PROTECT refuses one that arrives meanwhile.
    """
    with transaction.atomic():
        # Locked (PostgreSQL: a new job's foreign key waits on it; SQLite: the IMMEDIATE transaction).
        locked = Destination.objects.select_for_update().filter(pk=destination.pk).first()
        if locked is None:
            return 0
        owed = owed_jobs([locked.pk]).get(locked.pk)
        if owed:
            raise DestinationInUse(locked.name, *owed)
        finished = ForwardJob.objects.filter(destination_id=locked.pk, state__in=FINISHED)
        count = 0
        while ids := list(finished.values_list("pk", flat=True)[:2000]):
            DeliveryAttempt.objects.filter(job_id__in=ids).delete()
            count += ForwardJob.objects.filter(pk__in=ids).delete()[0]
        try:
            locked.delete()
        except ProtectedError:
            raise DestinationInUse(locked.name, *owed_jobs([locked.pk]).get(locked.pk, (1, 0))) from None
    return count
