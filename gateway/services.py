"""Writes the DIMSE listener and the admin share: association events, node status, heartbeats."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone

from gateway.dimse.access import Decision
from gateway.dimse.echo import EchoResult, echo
from gateway.models import AssociationEvent, Heartbeat, Node


def record_association(
    *, decision: Decision, calling_ae: str, called_ae: str, peer_address: str, peer_port: int | None
) -> AssociationEvent:
    """Log an association request and mark its node as seen, in one transaction."""
    now = timezone.now()
    with transaction.atomic():
        association_event = AssociationEvent.objects.create(
            at=now,
            accepted=decision.accepted,
            reason=decision.reason,
            detail=decision.detail[:255],
            calling_ae=calling_ae.strip()[:16],
            called_ae=called_ae.strip()[:16],
            peer_address=peer_address[:64],
            peer_port=peer_port,
            node=decision.node,
            outcome="" if decision.accepted else "rejected",
            ended_at=None if decision.accepted else now,
        )
        if decision.node is not None:
            Node.objects.filter(pk=decision.node.pk).update(last_seen_at=now, last_seen_address=peer_address[:64])
    return association_event


def finish_association(*, event_id: int, outcome: str, requests: int) -> None:
    """Close an association's event: released or aborted, and how much it did."""
    AssociationEvent.objects.filter(pk=event_id).update(ended_at=timezone.now(), outcome=outcome, requests=requests)


def record_node_error(*, node: Node, error: str) -> None:
    """Remember the last failure talking to a node, for the admin list."""
    now = timezone.now()
    Node.objects.filter(pk=node.pk).update(last_error=error, last_error_at=now)


def clear_node_error(*, node: Node) -> None:
    Node.objects.filter(pk=node.pk).update(last_error="", last_error_at=None)


def process_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(*, kind: str, address: str = "", started_at=None, instance: str | None = None) -> None:
    """Upsert this process's heartbeat row; /healthz and the dashboard read it."""
    now = timezone.now()
    Heartbeat.objects.update_or_create(
        kind=kind,
        instance=instance or process_instance(),
        defaults={"beat_at": now, "address": address},
        create_defaults={"beat_at": now, "address": address, "started_at": started_at or now},
    )


def stop_beating(*, kind: str) -> None:
    Heartbeat.objects.filter(kind=kind, instance=process_instance()).delete()


def prune_association_events(*, older_than_days: int) -> int:
    """Delete association events past retention; returns how many went."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = AssociationEvent.objects.filter(at__lt=cutoff).delete()
    return deleted


def verify_node(*, node: Node, timeout: float | None = None) -> EchoResult:
    """C-ECHO a node and keep the outcome on it (last error, or cleared on success)."""
    result = echo(host=node.host, port=node.port, ae_title=node.ae_title, timeout=timeout)
    if result.ok:
        clear_node_error(node=node)
    else:
        record_node_error(node=node, error=f"Verify: {result.message}")
    return result


def verify_nodes(*, nodes: list[Node], timeout: float | None = None) -> list[tuple[Node, EchoResult]]:
    """Verify several nodes in parallel, so one unreachable node does not hold up the rest."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(nodes)))) as pool:
        results = list(pool.map(lambda node: _verify_in_thread(node, timeout), nodes))
    return list(zip(nodes, results, strict=True))


def _verify_in_thread(node: Node, timeout: float | None) -> EchoResult:
    try:
        return verify_node(node=node, timeout=timeout)
    finally:
        connection.close()
