"""Verification SOP Class (C-ECHO), PS3.4 Annex A."""

from __future__ import annotations

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway import metrics
from gateway.dimse.handlers import allowed
from gateway.dimse.status import Status


def add_contexts(ae: AE) -> None:
    ae.add_supported_context(Verification)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: success, unless the node may not use verification."""
    status = Status.SUCCESS if allowed(event, "echo") else Status.REFUSED_NOT_AUTHORIZED
    metrics.DIMSE_REQUESTS.labels("echo", f"0x{status:04X}").inc()
    return status


HANDLERS = [(evt.EVT_C_ECHO, handle_echo)]
