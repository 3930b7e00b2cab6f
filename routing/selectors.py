"""Per-destination figures for the operators: the admin, the dashboard, /metrics and /healthz share them.

Each function answers in a fixed number of aggregate queries (grouped by
destination), however many destinations and jobs there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Min, Q
from django.utils import timezone

from routing.models import DeliveryAttempt, Destination, ForwardJob

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Backlog:
    """What a destination still owes: pending and dead jobs, and when the oldest pending one arrived."""

    pending: int = 0
    dead: int = 0
    oldest_pending_at: datetime | None = None


@dataclass(frozen=True)
class DestinationStats:
    destination: Destination
    backlog: Backlog
    delivered_1h: int = 0
    failed_1h: int = 0
    delivered_24h: int = 0
    failed_24h: int = 0
    now: datetime | None = None

    @property
    def pending(self) -> int:
        return self.backlog.pending

    @property
    def dead(self) -> int:
        return self.backlog.dead

    @property
    def oldest_pending_at(self) -> datetime | None:
        return self.backlog.oldest_pending_at

    @property
    def oldest_age_seconds(self) -> float:
        """Age of the oldest pending job; 0 when nothing is pending."""
        if self.backlog.oldest_pending_at is None:
            return 0.0
        return max(0.0, ((self.now or timezone.now()) - self.backlog.oldest_pending_at).total_seconds())


def backlogs() -> dict[int, Backlog]:
    """Pending and dead counts and the oldest pending job, by destination id: one query."""
    State = ForwardJob.State
    rows = (
        ForwardJob.objects.filter(state__in=(State.PENDING, State.DEAD))
        .order_by()
        .values("destination_id")
        .annotate(
            pending=Count("pk", filter=Q(state=State.PENDING)),
            dead=Count("pk", filter=Q(state=State.DEAD)),
            oldest=Min("created_at", filter=Q(state=State.PENDING)),
        )
    )
    return {row["destination_id"]: Backlog(row["pending"], row["dead"], row["oldest"]) for row in rows}


def outcome_counts(now: datetime) -> dict[int, dict[str, int]]:
    """Delivered and failed attempts over the last hour and day, by destination id: one query."""
    Outcome = DeliveryAttempt.Outcome
    delivered = Q(outcome=Outcome.DELIVERED)
    failed = Q(outcome__in=(Outcome.RETRY, Outcome.DEAD))
    recent = Q(at__gte=now - HOUR)
    rows = (
        DeliveryAttempt.objects.filter(at__gte=now - DAY)
        .order_by()
        .values("destination_id")
        .annotate(
            delivered_1h=Count("pk", filter=delivered & recent),
            failed_1h=Count("pk", filter=failed & recent),
            delivered_24h=Count("pk", filter=delivered),
            failed_24h=Count("pk", filter=failed),
        )
    )
    return {row.pop("destination_id"): row for row in rows}


def destination_stats(*, now: datetime | None = None) -> list[DestinationStats]:
    """Every destination with its backlog and recent outcomes, ordered by name: three queries."""
    now = now or timezone.now()
    queues = backlogs()
    outcomes = outcome_counts(now)
    return [
        DestinationStats(
            destination=destination,
            backlog=queues.get(destination.pk, Backlog()),
            now=now,
            **outcomes.get(destination.pk, {}),
        )
        for destination in Destination.objects.select_related("node").order_by("name")
    ]


def overdue_backlogs(*, threshold_seconds: float, now: datetime | None = None) -> list[dict]:
    """Destinations whose oldest pending job waited longer than the threshold (for /healthz)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=threshold_seconds)
    names = dict(Destination.objects.values_list("pk", "name"))
    return [
        {
            "destination": names.get(pk, str(pk)),
            "pending": backlog.pending,
            "oldest_age_seconds": round((now - backlog.oldest_pending_at).total_seconds(), 1),
        }
        for pk, backlog in sorted(backlogs().items(), key=lambda item: names.get(item[0], ""))
        if backlog.oldest_pending_at is not None and backlog.oldest_pending_at < cutoff
    ]


def destination_backlogs_by_name(*, now: datetime | None = None) -> dict[str, tuple[int, int, float]]:
    """(pending, dead, oldest pending age in seconds) for every destination, by name (for /metrics)."""
    now = now or timezone.now()
    queues = backlogs()
    figures = {}
    for pk, name in Destination.objects.order_by("name").values_list("pk", "name"):
        backlog = queues.get(pk, Backlog())
        oldest = backlog.oldest_pending_at
        figures[name] = (backlog.pending, backlog.dead, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    return figures
