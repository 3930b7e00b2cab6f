"""Who may send HL7: the registered senders applied to a message's source address and type.

The DIMSE side has gateway/dimse/access.py; this is the same registry idea for
the HL7 port, where orders, demographics and merges arrive. Refusals are kept
as one counted row per address and reason, so a flood cannot grow the table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from gateway.models import Hl7Refusal, Hl7Sender

Reason = Hl7Refusal.Reason
SEEN_EVERY = timedelta(seconds=30)  # the admin shows "N minutes ago"


@dataclass(frozen=True)
class Verdict:
    """The decision on one message; `text` explains a refusal to the sender (MSA-3/ERR-8), no patient data."""

    accepted: bool
    reason: str = ""
    sender: Hl7Sender | None = None
    text: str = ""


def peer_ip(peer: str) -> str:
    """The IP of a peer named "ip:port" (as the MLLP server names it), IPv4-mapped IPv6 as plain IPv4."""
    host = (peer.rpartition(":")[0] or peer).strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def decide(*, address: str, message_type: str) -> Verdict:
    """The enabled sender whose network covers `address` most narrowly decides which types it may send."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    covering = [sender for sender in Hl7Sender.objects.filter(enabled=True) if ip is not None and sender.covers(ip)]
    if not covering:
        if not settings.REQUIRE_KNOWN_HL7_SENDER:
            return Verdict(True)
        return Verdict(False, Reason.UNKNOWN_SENDER, text=f"{address} is not a registered HL7 sender")
    narrowest = max(sender.network.prefixlen for sender in covering)
    closest = [sender for sender in covering if sender.network.prefixlen == narrowest]
    allowing = next((sender for sender in closest if sender.allows(message_type)), None)
    if allowing is None:
        name = closest[0].name
        return Verdict(False, Reason.TYPE_NOT_ALLOWED, closest[0], f"sender {name} may not send {message_type or '-'}")
    return Verdict(True, sender=allowing)


def mark_seen(*, sender: Hl7Sender, address: str) -> None:
    """The admin's "last seen" for a sender: written at most every SEEN_EVERY from one address, not per message."""
    now = timezone.now()
    if sender.last_seen_address == address and sender.last_seen_at and now - sender.last_seen_at < SEEN_EVERY:
        return
    Hl7Sender.objects.filter(pk=sender.pk).update(last_seen_at=now, last_seen_address=address[:64])


def record_refusal(*, verdict: Verdict, address: str, message_type: str, control_id: str) -> None:
    """Count a refused message on its (address, reason) row, creating the row on the first one."""
    now = timezone.now()
    key = {"peer_address": address[:64], "reason": verdict.reason}
    last = {"message_type": message_type[:16], "control_id": control_id[:64], "sender": verdict.sender, "last_at": now}
    if Hl7Refusal.objects.filter(**key).update(count=F("count") + 1, **last):
        return
    try:
        with transaction.atomic():
            Hl7Refusal.objects.create(**key, **last, count=1, first_at=now)
    except IntegrityError:  # another connection created it first
        Hl7Refusal.objects.filter(**key).update(count=F("count") + 1, **last)


def prune_refusals(*, older_than_days: int) -> int:
    """Forget addresses not refused within the retention period."""
    deleted, _ = Hl7Refusal.objects.filter(last_at__lt=timezone.now() - timedelta(days=older_than_days)).delete()
    return deleted
