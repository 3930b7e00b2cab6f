"""Opening an association from Isthmus to a remote node: forwarding, commitment reports, MPPS relay.

One place for what every outgoing association needs: our AE title, the
timeouts, TCP_NODELAY, and a failure that says why in one line (connect
error, rejected, aborted). Verify (echo.py) has its own, more detailed
diagnosis.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from gateway.dimse.sockets import set_nodelay


class NotAssociated(Exception):
    """No association was established; the message says with whom and why (no patient data)."""


def associate(
    *,
    host: str,
    port: int,
    ae_title: str,
    contexts: Iterable[PresentationContext] = (),
    abstract_syntaxes: Iterable[str] = (),
    timeout: float,
    connect_timeout: float | None = None,
    ext_neg: list | None = None,
) -> Association:
    """An established association to `ae_title`@`host`:`port`, or NotAssociated."""
    ae = AE(ae_title=settings.AE_TITLE)
    ae.requested_contexts = list(contexts)
    for abstract_syntax in abstract_syntaxes:
        ae.add_requested_context(abstract_syntax)
    ae.connection_timeout = connect_timeout if connect_timeout is not None else timeout
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    where = f"{ae_title}@{host}:{port}"
    try:
        assoc = ae.associate(
            host, port, ae_title=ae_title, ext_neg=ext_neg, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
        )
    except (OSError, ValueError) as exc:
        raise NotAssociated(f"cannot connect to {where}: {exc}") from exc
    if not assoc.is_established:
        outcome = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise NotAssociated(f"association with {where} {outcome} (peer down, refusing or unreachable)")
    return assoc
