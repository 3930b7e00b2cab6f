"""What /healthz checks: the database, the queue broker, the storage directory, and live listeners."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from gateway.celery import app as celery_app
from gateway.models import Heartbeat

BROKER_TIMEOUT = 3.0


def check_database() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True, "vendor": connection.vendor}
    except Exception as exc:
        connection.close()
        return {"ok": False, "error": _first_line(exc)}


def check_broker() -> dict[str, Any]:
    if settings.EMBEDDED_QUEUE:
        writable = _writable(settings.QUEUE_DIR)
        return {
            "ok": writable,
            "transport": "filesystem",
            **({} if writable else {"error": "queue directory not writable"}),
        }
    try:
        with celery_app.connection_for_write() as broker:
            broker.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)
        return {"ok": True, "transport": broker.transport_cls}
    except Exception as exc:
        return {"ok": False, "error": _first_line(exc)}


def check_storage() -> dict[str, Any]:
    root = settings.DATA_DIR
    if not _writable(root):
        return {"ok": False, "path": str(root), "error": "not writable"}
    usage = shutil.disk_usage(root)
    ok = usage.free >= settings.MIN_FREE_BYTES
    result = {"ok": ok, "path": str(root), "free_bytes": usage.free, "min_free_bytes": settings.MIN_FREE_BYTES}
    if not ok:
        result["error"] = "free space below ISTHMUS_MIN_FREE_MB"
    return result


def check_listener(kind: str) -> dict[str, Any]:
    """Alive when at least one process of `kind` has beaten recently (several may run)."""
    cutoff = timezone.now() - timedelta(seconds=settings.HEARTBEAT_STALE_AFTER)
    try:
        beats = list(Heartbeat.objects.filter(kind=kind).order_by("-beat_at")[:20])
    except Exception as exc:
        connection.close()
        return {"ok": False, "error": f"unknown, database unavailable: {_first_line(exc)}"}
    live = [b for b in beats if b.beat_at >= cutoff]
    result: dict[str, Any] = {"ok": bool(live), "live": [{"instance": b.instance, "address": b.address} for b in live]}
    if not live:
        last = beats[0].beat_at.isoformat() if beats else "never"
        result["error"] = f"no {kind} heartbeat in {settings.HEARTBEAT_STALE_AFTER:g} s (last: {last})"
    return result


CRITICAL = {
    "database": check_database,
    "broker": check_broker,
    "storage": check_storage,
    "dimse": lambda: check_listener("dimse"),
}
# Reported, but not a reason to fail: a worker being down delays work and loses none; an
# HL7 listener being down leaves the RIS queueing its orders (and some sites type them in).
INFORMATIONAL = {"worker": lambda: check_listener("worker"), "hl7": lambda: check_listener("hl7")}


def check_routing_backlog() -> dict[str, Any]:
    """Degraded, not failing: a destination whose oldest pending job waited past the alert threshold."""
    from routing.selectors import overdue_backlogs

    threshold = settings.ROUTING_BACKLOG_ALERT_SECONDS
    try:
        overdue = overdue_backlogs(threshold_seconds=threshold)
    except Exception as exc:
        connection.close()
        return {"ok": False, "error": f"unknown, database unavailable: {_first_line(exc)}"}
    result: dict[str, Any] = {"ok": not overdue, "threshold_seconds": threshold, "overdue": overdue}
    if overdue:
        names = ", ".join(entry["destination"] for entry in overdue)
        result["error"] = f"backlog older than {threshold:g} s at: {names}"
    return result


# Flagged as "degraded" while the answer stays 200: nothing is down, but someone should look.
DEGRADING = {"routing": check_routing_backlog}


def run_checks() -> dict[str, Any]:
    checks = {name: check() for name, check in CRITICAL.items()}
    failing = [name for name, result in checks.items() if not result["ok"]]
    checks.update({name: check() for name, check in INFORMATIONAL.items()})
    checks.update({name: check() for name, check in DEGRADING.items()})
    degraded = [name for name in DEGRADING if not checks[name]["ok"]]
    status = "fail" if failing else "degraded" if degraded else "ok"
    return {"status": status, "failing": failing, "degraded": degraded, "checks": checks}


def _writable(path: os.PathLike) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".healthz-"):
            return True
    except OSError:
        return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
