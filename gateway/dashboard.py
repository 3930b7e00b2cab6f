"""The numbers on the admin's front page: storage, nodes, live processes, commitment reports."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone

from gateway.models import CommitmentRequest, Heartbeat, Instance, Node, Patient, Series, Study

MAX_NODES = 50
MAX_REPORTS = 10


def summary() -> dict[str, Any]:
    """Everything the dashboard shows, in a fixed, small number of queries."""
    return {
        "storage": storage(),
        "nodes": list(
            Node.objects.order_by("name").only(
                "name", "ae_title", "host", "port", "enabled", "last_seen_at", "last_error", "last_error_at"
            )[:MAX_NODES]
        ),
        "processes": processes(),
        "commitments": commitments(),
        "routing": routing(),
    }


def storage() -> dict[str, Any]:
    totals = Instance.objects.aggregate(instances=Count("pk"), bytes_used=Sum("size"))
    usage = shutil.disk_usage(_existing(Path(settings.STORAGE_DIR)))
    return {
        "bytes_used": totals["bytes_used"] or 0,
        "instances": totals["instances"],
        "series": Series.objects.count(),
        "studies": Study.objects.count(),
        "patients": Patient.objects.count(),
        "disk_free": usage.free,
        "disk_total": usage.total,
        "low_on_space": usage.free < settings.MIN_FREE_BYTES,
        "path": str(settings.STORAGE_DIR),
    }


def _existing(path: Path) -> Path:
    """The storage root, or its nearest existing parent before the first instance arrives."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def processes() -> list[dict[str, Any]]:
    cutoff = timezone.now() - timedelta(seconds=settings.HEARTBEAT_STALE_AFTER)
    return [
        {"kind": beat.kind, "instance": beat.instance, "address": beat.address, "started_at": beat.started_at,
         "beat_at": beat.beat_at, "alive": beat.beat_at >= cutoff}
        for beat in Heartbeat.objects.order_by("kind", "instance")
    ]  # fmt: skip


def commitments() -> dict[str, Any]:
    State = CommitmentRequest.State
    counts = CommitmentRequest.objects.aggregate(
        pending=Count("pk", filter=Q(state=State.PENDING)),
        failed=Count("pk", filter=Q(state=State.FAILED)),
        oldest_pending=Min("received_at", filter=Q(state=State.PENDING)),
    )
    pending = (
        CommitmentRequest.objects.filter(state=State.PENDING)
        .order_by("received_at")
        .only("transaction_uid", "calling_ae", "attempts", "next_attempt_at", "last_error", "received_at")[:MAX_REPORTS]
    )
    return {**counts, "oldest": list(pending)}


def routing() -> list[Any]:
    """Per-destination queue figures (routing.selectors, three queries), for the dashboard's queue table."""
    from routing.selectors import destination_stats

    return destination_stats()
