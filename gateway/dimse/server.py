"""The DIMSE listener: one pynetdicom AE built from settings, with a heartbeat and a graceful stop."""

from __future__ import annotations

import importlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from django.conf import settings
from pynetdicom import AE, evt

from gateway import store
from gateway.dimse import guard
from gateway.dimse.admission import Admission
from gateway.dimse.handlers import HANDLERS
from gateway.heartbeat import HeartbeatThread

log = logging.getLogger("isthmus.dimse")

# One module per DIMSE service; each offers `add_contexts(ae)` and `HANDLERS`
# (pynetdicom (event, handler) pairs). Association control lives in handlers.py.
SERVICE_MODULES = (
    "gateway.dimse.verification",
    "gateway.dimse.storage",
    "gateway.dimse.query_retrieve",
    "gateway.dimse.commitment",
    "gateway.dimse.worklist",
    "gateway.dimse.mpps",
)


def service_modules() -> list:
    return [importlib.import_module(name) for name in SERVICE_MODULES]


def _by_sop_class(routes: dict) -> Callable:
    def dispatch(event: evt.Event):
        return routes[event.request.AffectedSOPClassUID](event)

    return dispatch


def all_handlers() -> list:
    """Association control, then each service's handlers; an event two services bind
    (EVT_C_FIND: worklist and Q/R) is routed by the request's SOP class (module.SOP_CLASSES)."""
    pairs, shared = list(HANDLERS), defaultdict(dict)
    for module in service_modules():
        for event, handler in module.HANDLERS:
            for sop_class in getattr(module, "SOP_CLASSES", ()):
                shared[event][sop_class] = handler
            pairs.append((event, handler))
    # pynetdicom keeps one handler per intervention event: the last bound.
    counts = Counter(event for event, _ in pairs if event.is_intervention)
    routed = {event for event, n in counts.items() if n > 1}
    return [(e, h) for e, h in pairs if e not in routed] + [(e, _by_sop_class(shared[e])) for e in routed]


def build_ae() -> AE:
    """Our application entity with every service the listener offers."""
    ae = AE(ae_title=settings.AE_TITLE)
    for module in service_modules():
        module.add_contexts(ae)
    # pynetdicom counts every connection, asked or not, against this; ours (handlers.py) counts accepted
    # associations, and admission.py the connections: keep pynetdicom's out of the way of both.
    ae.maximum_associations = settings.DIMSE_MAX_CONNECTIONS + settings.DIMSE_MAX_ASSOCIATIONS
    ae.maximum_pdu_size = settings.DIMSE_MAX_PDU
    ae.network_timeout = settings.DIMSE_IDLE_TIMEOUT
    ae.acse_timeout = settings.DIMSE_ARTIM_TIMEOUT  # PS3.8 9.1.5: the wait for an A-ASSOCIATE-RQ
    ae.dimse_timeout = settings.DIMSE_TIMEOUT
    # Called/calling AE checks happen in handlers.handle_requested, against the registry.
    ae.require_called_aet = False
    return ae


class Listener:
    """Serves associations on a port until stop(); stop() lets in-flight ones finish."""

    def __init__(self, host: str, port: int, reuse_port: bool = False) -> None:
        self.host, self.port, self.reuse_port = host, port, reuse_port
        self.ae = build_ae()
        self.server = None
        self.heartbeat = HeartbeatThread("dimse")
        self.admission = Admission(
            total=settings.DIMSE_MAX_CONNECTIONS, per_host=settings.DIMSE_MAX_CONNECTIONS_PER_HOST
        )

    @property
    def address(self) -> str:
        return f"{settings.AE_TITLE}@{self.host}:{self.port}"

    def start(self) -> None:
        store.sweep_temp_files()  # temp files of a listener that died mid-transfer
        self.server = guard.serve(self.ae, (self.host, self.port), all_handlers(), self.admission, self.reuse_port)
        self.admission.start()
        self.port = self.server.server_address[1]
        self.heartbeat.start(self.address)
        log.info("DIMSE listener %s ready", self.address)

    def active(self) -> list:
        """Established associations we accepted: the work SIGTERM must let finish."""
        return [a for a in self.ae.active_associations if a.is_acceptor and a.is_established]

    def stop(self, grace: float) -> None:
        """Stop accepting, wait up to `grace` seconds for open associations, abort the rest."""
        if self.server is not None:
            self.server.shutdown()
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for association in self.active():
            log.warning("aborting association with %s at shutdown", association.requestor.ae_title)
            association.abort()
        self.admission.stop()
        self.heartbeat.stop()
        log.info("DIMSE listener stopped")
