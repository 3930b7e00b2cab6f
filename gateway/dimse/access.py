"""Who may associate with us: the node registry applied to an A-ASSOCIATE-RQ."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings

from gateway.models import AssociationEvent, Node

Reason = AssociationEvent.Reason

# PS3.8 9.3.4: (result, source, diagnostic) of an A-ASSOCIATE-RJ.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded


@dataclass(frozen=True)
class Decision:
    """The verdict on one association request."""

    accepted: bool
    reason: str
    node: Node | None = None
    reject: tuple[int, int, int] | None = None
    detail: str = ""


def normalise_address(address: str) -> str:
    """An IP address as the registry compares it: an IPv4-mapped IPv6 address as plain IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


@lru_cache(maxsize=512)
def _resolve_cached(host: str, _ttl_bucket: int) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return frozenset()
    return frozenset(normalise_address(info[4][0]) for info in infos)


def resolve(host: str) -> frozenset[str]:
    """Addresses of a node's host; a name is looked up again after a minute."""
    try:
        return frozenset({normalise_address(str(ipaddress.ip_address(host)))})
    except ValueError:
        return _resolve_cached(host.lower(), int(time.monotonic() // 60))


def host_matches(node: Node, peer_address: str) -> bool:
    return not node.host or normalise_address(peer_address) in resolve(node.host)


def decide(calling_ae: str, called_ae: str, peer_address: str, open_associations: int = 0) -> Decision:
    """Apply the called AE, the node registry, the node's host and our capacity to a request."""
    calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
    if open_associations > settings.DIMSE_MAX_ASSOCIATIONS:
        return Decision(False, Reason.BUSY, reject=REJECT_BUSY, detail=f"{settings.DIMSE_MAX_ASSOCIATIONS} open")
    if called_ae != settings.AE_TITLE:
        return Decision(False, Reason.CALLED_AE, reject=REJECT_CALLED_AE, detail=f"we are {settings.AE_TITLE}")
    nodes = list(Node.objects.filter(ae_title=calling_ae))
    if not nodes:
        if settings.REQUIRE_KNOWN_AE:
            return Decision(False, Reason.CALLING_AE, reject=REJECT_CALLING_AE)
        return Decision(True, Reason.ACCEPTED, detail="unregistered AE accepted (ISTHMUS_REQUIRE_KNOWN_AE=false)")
    # A node pinned to this host wins over one that accepts any host.
    matching = sorted((n for n in nodes if host_matches(n, peer_address)), key=lambda n: not n.host)
    if not matching:
        hosts = ", ".join(sorted({n.host for n in nodes}))
        return Decision(False, Reason.HOST_MISMATCH, reject=REJECT_CALLING_AE, detail=f"registered host: {hosts}")
    node = matching[0]
    if not node.enabled:
        return Decision(False, Reason.DISABLED, node=node, reject=REJECT_CALLING_AE)
    if not node.allowed_in:
        return Decision(False, Reason.NOT_ALLOWED_IN, node=node, reject=REJECT_CALLING_AE)
    return Decision(True, Reason.ACCEPTED, node=node)
