"""The DIMSE port's defences against hostile and broken peers: every touch of pynetdicom's internals they need.

pynetdicom 3.0.4 reads a PDU by trusting its declared length (up to 4 GiB,
into memory) and blocks inside it with no deadline, so one byte a second holds
a thread for ever and its ARTIM and idle timers never fire; it buffers command
sets and non-storage data sets without limit; an exception while decoding a
P-DATA escapes its DUL thread, leaving no A-ABORT and no EVT_CONN_CLOSE. It has
no hooks for any of this, so this module replaces, pinned to 3.0.4 (install()
checks the version; tests/gateway/test_dimse_guard.py the replaced sources):

- DULServiceProvider._read_pdu_data -> read_pdu(): the length is checked
  against a bound per PDU type before the body is read, and the whole PDU must
  arrive before a deadline (ARTIM for the association request);
- DULServiceProvider.run_reactor -> run_reactor(): an exception in the state
  machine ends the connection instead of orphaning it;
- DIMSEServiceProvider.receive_primitive -> receive_primitive(): bounded
  buffers; a message past them, or that cannot be decoded, cuts the
  association (A-ABORT and close) with one log line;
- RequestHandler.handle (GuardedRequestHandler) and the accept loop
  (GuardedServer): connection caps at accept time (admission.py), a send
  deadline on every accepted socket, and a cheap copy of the supported
  contexts for each connection;
- pynetdicom's own tracebacks for undecodable peer data become one line, and
  its standard (debug) handlers are not bound;
- released(): how an association ended, read without pynetdicom's race;
  at_association_end(): clean-up when an association's thread ends.

The gateway's other pynetdicom patches are in reactor.py and storage.py.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

import pynetdicom
from django.conf import settings
from pynetdicom import AE, _config, association, dimse, dul, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway import metrics
from gateway.dimse.admission import Admission
from gateway.logthrottle import Throttled

log = logging.getLogger("isthmus.dimse")

PINNED = "3.0.4"

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
# PS3.8 9.3.2-9.3.3: the maximum PDU length binds P-DATA-TF only. A real request with ~130
# presentation contexts is tens of KB; user identity items add at most a few 64 KB fields.
ASSOCIATE_BOUND = 256 * 1024
FIXED_BOUND = 64  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long (PS3.8 9.3.4, 9.3.6-9.3.8)
DATA_MARGIN = 4096  # for peers that count the max PDU length without the PDV item headers
UNLIMITED_PDU = 16 * 1024 * 1024  # what ISTHMUS_DIMSE_MAX_PDU=0 ("no limit" to pynetdicom) is held to
MAX_COMMAND_BYTES = 1024 * 1024  # command sets are a few hundred bytes (PS3.7 9.3, 10.3)
RECV_CHUNK = 1024 * 1024
# PS3.8 9.3.8 A-ABORT reason/diagnostic when the source is the service provider.
UNRECOGNIZED_PDU, INVALID_PARAMETER_VALUE, NOT_SPECIFIED = 0x01, 0x06, 0x00
NO_ASSOCIATION = ("Sta1", "Sta2")  # transport open, no association request yet: close, nothing to abort

_cuts = Throttled(log)


class _Closed(Exception):
    """The peer closed the connection; `partial` when it did so inside a PDU."""

    def __init__(self, partial: bool) -> None:
        self.partial = partial


class _Overdue(Exception):
    pass


class MessageTooLarge(ValueError):
    pass


def pdu_bound(assoc, pdu_type: int) -> int:
    """The largest PDU of `pdu_type` we read: what we advertised for P-DATA-TF (PS3.8 D.1), fixed bounds for the rest."""
    if pdu_type == 0x04:
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        return (local.maximum_length or UNLIMITED_PDU) + DATA_MARGIN
    return ASSOCIATE_BOUND if pdu_type in (0x01, 0x02) else FIXED_BOUND


def _peer(assoc) -> str:
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    info = remote.address_info
    return f"{info.address}:{info.port}" if info is not None else "?"


def awaiting_request(provider: dul.DULServiceProvider) -> bool:
    """Whether a connection's DUL is waiting for the association request (PS3.8 Sta2); reactor.py polls it slowly."""
    return provider.state_machine.current_state == "Sta2"


def _deadline(provider: dul.DULServiceProvider) -> tuple[float, str]:
    """When the PDU about to be read must be complete, and which limit sets it."""
    limit, which = settings.DIMSE_PDU_TIMEOUT, "ISTHMUS_DIMSE_PDU_TIMEOUT"
    artim = provider.artim_timer
    if provider.assoc.is_acceptor and provider.state_machine.current_state in NO_ASSOCIATION:
        if artim.timeout is not None and artim.remaining < limit:  # PS3.8 9.1.5: the request within ARTIM
            limit, which = max(artim.remaining, 0.0), "ISTHMUS_DIMSE_ARTIM_TIMEOUT"
    return time.monotonic() + limit, which


def _receive_into(raw: socket.socket, view: memoryview, deadline: float, started: bool) -> None:
    """Fill `view` from the socket by `deadline` (absolute: a slow trickle does not extend it)."""
    got, size = 0, len(view)
    previous = raw.gettimeout()
    try:
        while got < size:
            raw.settimeout(max(deadline - time.monotonic(), 0.001))  # past the deadline: only what is there
            try:
                count = raw.recv_into(view[got:], min(size - got, RECV_CHUNK))
            except TimeoutError:
                raise _Overdue from None
            if not count:
                raise _Closed(partial=started or got > 0)
            got += count
    finally:
        raw.settimeout(previous)


def read_pdu(provider: dul.DULServiceProvider) -> None:
    """Replaces DULServiceProvider._read_pdu_data: bounded length, a deadline, one log line for whatever goes wrong."""
    raw = provider.socket.socket if provider.socket is not None else None
    if raw is None:
        provider.event_queue.put("Evt17")  # Transport connection closed
        return
    deadline, which = _deadline(provider)
    header = bytearray(6)
    try:
        _receive_into(raw, memoryview(header), deadline, started=False)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in PDU_NAMES:
            _cut(provider, "malformed-pdu", f"sent an unknown PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)
            return
        bound = pdu_bound(provider.assoc, pdu_type)
        if length > bound:
            detail = f"declared {length} bytes for its {PDU_NAMES[pdu_type]}, more than the {bound} we read"
            _cut(provider, "pdu-too-large", detail, INVALID_PARAMETER_VALUE, kind=pdu_type)
            return
        pdu_bytes = bytearray(6 + length)  # one buffer, filled in place
        pdu_bytes[:6] = header
        _receive_into(raw, memoryview(pdu_bytes)[6:], deadline, started=True)
    except _Closed as closed:
        if closed.partial:
            peer = _peer(provider.assoc)
            _cuts.info(("closed", peer.rsplit(":", 1)[0]), "DIMSE peer %s closed the connection inside a PDU", peer)
        _peer_closed(provider)
        return
    except _Overdue:
        _cut(provider, "pdu-timeout", f"did not complete a PDU in time ({which})", NOT_SPECIFIED)
        return
    except OSError:  # reset by the peer
        _peer_closed(provider)
        return
    try:
        pdu, event = provider._decode_pdu(pdu_bytes)
        if pdu_type != 0x04:
            pdu.to_primitive()  # what the state machine does next, and fails on (an even context ID, a bad reason)
    except Exception as exc:
        _cut(
            provider,
            "malformed-pdu",
            f"sent an undecodable {PDU_NAMES[pdu_type]} ({type(exc).__name__})",
            INVALID_PARAMETER_VALUE,
        )
        return
    provider.event_queue.put(event)
    provider._recv_pdu.put(pdu)


def _peer_closed(provider: dul.DULServiceProvider) -> None:
    provider.event_queue.put("Evt17")  # Transport connection closed
    _wake_waiting_acceptor(provider)


def _wake_waiting_acceptor(provider: dul.DULServiceProvider) -> None:
    """Before an association request, pynetdicom's acceptor thread waits for it until ARTIM, even once the
    connection is gone, holding its connection slot: give it the None its timeout would give it, now.

    Not when a request was read and its event is still queued (the state lags the reads): it gets that.
    """
    waiting = provider.assoc.is_acceptor and provider.state_machine.current_state in NO_ASSOCIATION
    if waiting and "Evt6" not in provider.event_queue.queue:
        provider.to_user_queue.put(None)


def _cut(provider: dul.DULServiceProvider, reason: str, detail: str, diagnostic: int, kind: object = None) -> None:
    """End the connection without reading on: A-ABORT first if an association exists, one log line, a metric.

    The line is throttled per reason (and `kind`) and source address: a peer that reconnects in a loop logs once.
    """
    assoc, state = provider.assoc, provider.state_machine.current_state
    peer = _peer(assoc)
    associated = state not in NO_ASSOCIATION and state != "Sta13"
    outcome = "association aborted" if associated else "connection closed"
    _cuts.warning((reason, kind, peer.rsplit(":", 1)[0]), "DIMSE peer %s %s: %s", peer, detail, outcome)
    metrics.DIMSE_REFUSED.labels(reason).inc()
    raw = provider.socket.socket
    if associated and raw is not None:
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, diagnostic  # PS3.8 9.3.8: from the service provider
        try:
            raw.settimeout(1.0)
            raw.sendall(abort.encode())
        except OSError:
            pass
    provider.socket.close()  # Evt17: AA-5 before an association, AA-4 in one, AR-5 once closing
    _wake_waiting_acceptor(provider)


def note_silent_close(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: a connection that ARTIM closed before any association request gets its one line and metric."""
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.artim_timer.expired:
        peer = _peer(assoc)
        _cuts.warning(
            ("artim-timeout", None, peer.rsplit(":", 1)[0]),
            "DIMSE peer %s sent no association request in time (ISTHMUS_DIMSE_ARTIM_TIMEOUT): connection closed",
            peer,
        )
        metrics.DIMSE_REFUSED.labels("artim-timeout").inc()


def run_reactor(provider: dul.DULServiceProvider) -> None:
    """Replaces DULServiceProvider.run_reactor, to end the connection if pynetdicom's state machine raises.

    It logs the error and re-raises, which ended the DUL thread and left the
    socket open and the association thread waiting; read_pdu() prevents the
    cases known, this is for the others.
    """
    try:
        _run_reactor(provider)
    except Exception as exc:
        assoc = provider.assoc
        log.error("DIMSE connection with %s ended: pynetdicom failed on it (%s)", _peer(assoc), type(exc).__name__)
        metrics.DIMSE_REFUSED.labels("malformed-pdu").inc()
        try:
            provider.socket.close()
        except Exception:
            pass
        if assoc.is_established:
            abort = A_P_ABORT()
            abort.provider_reason = NOT_SPECIFIED
            provider.to_user_queue.put(abort)  # the association's reactor sees the abort and ends
        else:
            provider.to_user_queue.put(None)  # an acceptor waiting for the request ends
        assoc.dimse.msg_queue.put((None, None))  # and so does a send_*() waiting for an answer


def receive_primitive(provider: dimse.DIMSEServiceProvider, primitive) -> None:
    """Replaces DIMSEServiceProvider.receive_primitive: buffers bounded, nothing raised into the DUL thread."""
    events = provider.dul.event_queue.queue
    refused_before = events.count("Evt19")
    try:
        _receive_primitive(provider, primitive)
        message = provider.message
        if message is not None:
            _check_buffers(message)
    except Exception as exc:
        _drop_message(provider, exc)
        return
    if events.count("Evt19") > refused_before:  # pynetdicom could not make a request of it and aborts (AA-8)
        _log_dropped(provider, "malformed-message", "not a valid DIMSE request")


def _check_buffers(message) -> None:
    """A message still arriving: its command set, and a data set kept in memory (not a C-STORE's file), are capped."""
    if message.encoded_command_set.tell() > MAX_COMMAND_BYTES:
        raise MessageTooLarge(f"command set past {MAX_COMMAND_BYTES} bytes")
    if message._data_set_file is None and message.data_set.tell() > settings.DIMSE_MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"data set past {settings.DIMSE_MAX_MESSAGE_BYTES} bytes (ISTHMUS_DIMSE_MAX_MESSAGE_MB)")


def _drop_message(provider: dimse.DIMSEServiceProvider, exc: Exception) -> None:
    """Forget the message and its temp file, and cut the association (A-ABORT, close: the peer may stream on)."""
    message, provider.message = provider.message, None
    temp_file = getattr(message, "_data_set_file", None)
    if temp_file is not None:
        from gateway.dimse.storage import discard

        discard(temp_file)
    reason = "message-too-large" if isinstance(exc, MessageTooLarge) else "malformed-message"
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    kind = exc.args[0].split(" past ")[0] if isinstance(exc, MessageTooLarge) else None  # command set, data set
    _cut(provider.dul, reason, f"sent a message we cannot take ({why})", INVALID_PARAMETER_VALUE, kind=kind)


def _log_dropped(provider: dimse.DIMSEServiceProvider, reason: str, why: str) -> None:
    peer = _peer(provider.assoc)
    _cuts.warning(
        (reason, None, peer.rsplit(":", 1)[0]),
        "DIMSE peer %s sent a message we cannot take (%s): association aborted",
        peer,
        why,
    )
    metrics.DIMSE_REFUSED.labels(reason).inc()


_at_end: list[Callable[[association.Association], None]] = []


def at_association_end(callback: Callable[[association.Association], None]) -> None:
    """Have `callback(assoc)` run when an accepted association's thread ends, however it ended.

    pynetdicom has no such event: EVT_RELEASED and EVT_ABORTED miss the ends
    where its reactor just stops (the DUL died, a request it ignores, a kill).
    """
    if callback not in _at_end:
        _at_end.append(callback)


def _ended(assoc: association.Association) -> None:
    for callback in _at_end:
        try:
            callback(assoc)
        except Exception:
            log.exception("clean-up after the association with %s failed", _peer(assoc))


def current_association() -> association.Association | None:
    """The association whose DUL thread is running this code (where pynetdicom decodes what a peer sends)."""
    thread = threading.current_thread()
    return thread.assoc if isinstance(thread, dul.DULServiceProvider) else None


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, plus: a send deadline on the socket, and the connection's slot given back when it ends."""

    def handle(self) -> None:
        server, address = self.server, self.client_address[0]
        started = False
        try:
            # A peer that stops reading cannot hold the DUL thread in send() for ever.
            self.request.settimeout(settings.DIMSE_PDU_TIMEOUT)
            assoc = self._create_association()
            run = assoc.run

            def run_then_release() -> None:
                try:
                    run()
                finally:
                    _ended(assoc)
                    server.admission.release(address)

            assoc.run = run_then_release  # an instance attribute: Thread.start() calls it in the new thread
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            started = True
        finally:
            if not started:
                server.admission.release(address)


class _Contexts(list):
    """The server's supported contexts, copied cheaply for each connection.

    pynetdicom deep-copies them for every connection before it reads a byte: 30 ms
    of CPU for our 180 contexts, so a loop of connects kept a core busy. A context
    holds only UIDs (immutable): copying each context and its transfer syntax list
    is the same copy, a hundred times cheaper.
    """

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection caps at accept time and, optionally, SO_REUSEPORT."""

    request_queue_size = 128  # socketserver's 5 drops SYNs from legitimate peers during a burst

    def __init__(self, *args, admission: Admission, reuse_port: bool = False, **kwargs) -> None:
        self.admission, self.reuse_port = admission, reuse_port
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)
        self.contexts = _Contexts(self.contexts)

    def server_bind(self) -> None:
        if self.reuse_port:  # several listener processes accept on one port; the kernel spreads connections
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:
        """socketserver closes the connection at once when this is False."""
        return self.admission.admit(client_address[0])

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to run the handler (resources exhausted): the slot is free again
            self.admission.release(client_address[0])
            raise

    def handle_error(self, request, client_address) -> None:
        log.error("DIMSE connection from %s could not be served", client_address[0], exc_info=True)


def serve(ae: AE, address: tuple[str, int], handlers: list, admission: Admission, reuse_port: bool) -> GuardedServer:
    """AE.start_server(block=False) with our server class (pynetdicom has no parameter for it)."""
    server = ae.make_server(
        address, evt_handlers=handlers, server_class=GuardedServer, admission=admission, reuse_port=reuse_port
    )
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    return server


def released(assoc) -> bool:
    """Whether an association that just closed ended by release.

    pynetdicom sets is_released only after queueing the A-RELEASE-RP, so the DUL
    thread may see the peer close (and fire EVT_CONN_CLOSE) first; the flag it
    sets before queueing the response does not race.
    """
    return assoc.is_released or (assoc._sent_release and not assoc._sent_abort and not assoc.is_aborted)


class _OneLine(logging.Filter):
    """pynetdicom logs a full traceback when peer data will not decode (an AE title, a DIMSE message): keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            record.msg = f"{type(exc).__name__}: {text}" if record.msg is exc else f"{record.getMessage()} ({text})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


# Where pynetdicom logs tracebacks for what a peer sent (an undecodable AE title or data set, a request its
# service class cannot serve); handler errors (ours) keep theirs: pynetdicom.events and .service_class.
PEER_DATA_LOGGERS = ("pynetdicom.utils", "pynetdicom.dsutils", "pynetdicom.association")

_receive_primitive = dimse.DIMSEServiceProvider.receive_primitive
_run_reactor = dul.DULServiceProvider.run_reactor


def install() -> None:
    """Put the guarded reader and receiver in pynetdicom (idempotent); refuses a pynetdicom this was not checked against."""
    if pynetdicom.__version__ != PINNED:
        raise RuntimeError(
            f"gateway/dimse/guard.py replaces internals of pynetdicom {PINNED}, found {pynetdicom.__version__}: "
            "review it (and tests/gateway/test_dimse_guard.py) before upgrading"
        )
    dul.DULServiceProvider._read_pdu_data = read_pdu
    dul.DULServiceProvider.run_reactor = run_reactor
    dimse.DIMSEServiceProvider.receive_primitive = receive_primitive
    # Its standard handlers format every PDU and message for DEBUG lines our logging drops, and raise on
    # malformed ones; its DIMSE logger only reports the invalid message receive_primitive() logs itself.
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom.dimse").setLevel(logging.CRITICAL)
    for name in PEER_DATA_LOGGERS:
        pynetdicom_logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLine) for f in pynetdicom_logger.filters):
            pynetdicom_logger.addFilter(_OneLine())


def installed() -> bool:
    return (
        dul.DULServiceProvider._read_pdu_data is read_pdu
        and dul.DULServiceProvider.run_reactor is run_reactor
        and dimse.DIMSEServiceProvider.receive_primitive is receive_primitive
    )
