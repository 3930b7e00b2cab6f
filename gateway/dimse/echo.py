"""C-ECHO as an SCU, with the exact reason when it fails: what Verify shows an administrator."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.dimse.sockets import set_nodelay

# PS3.8 9.3.4 A-ASSOCIATE-RJ fields, in words.
REJECT_RESULTS = {0x01: "permanent", 0x02: "transient"}
REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    rtt_ms: float | None = None
    status: int | None = None

    def __str__(self) -> str:
        timing = f" in {self.rtt_ms:.1f} ms" if self.rtt_ms is not None else ""
        return f"{self.message}{timing}"


class _ConnectErrors(logging.Handler):
    """pynetdicom logs, but does not raise, why a TCP connect failed; keep it per DUL thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        # thread ident -> (when, error); idents are reused, so callers check `when`.
        self.by_thread: dict[int, tuple[float, str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error:"):
            if len(self.by_thread) > 1000:  # other SCUs' failures nobody asks about
                self.by_thread.clear()
            self.by_thread[record.thread] = (record.created, message.split(":", 1)[1].strip())

    def pop(self, thread_ident: int | None, since: float) -> str | None:
        """The connect error logged by this thread since `since` (wall clock), if any."""
        when, error = self.by_thread.pop(thread_ident, (0.0, None)) if thread_ident else (0.0, None)
        return error if when >= since else None


_connect_errors = _ConnectErrors()
logging.getLogger("pynetdicom.transport").addHandler(_connect_errors)
_lock = threading.Lock()


def _describe_connect_error(error: str | None, elapsed: float, timeout: float) -> str:
    if error is None:
        return "no association: the peer closed the connection"
    lowered = error.lower()
    if "refused" in lowered:
        return "connection refused"
    if "timed out" in lowered or elapsed >= timeout * 0.95:
        return f"timeout: no TCP connection within {timeout:g} s"
    return f"connection failed ({error})"


def echo(
    *, host: str, port: int, ae_title: str, timeout: float | None = None, calling_ae: str | None = None
) -> EchoResult:
    """Open an association to `ae_title@host:port`, send one C-ECHO, release; never raises for network errors."""
    timeout = settings.DIMSE_TIMEOUT if timeout is None else timeout
    ae = AE(ae_title=calling_ae or settings.AE_TITLE)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    started, started_wall = time.perf_counter(), time.time()
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    except (OSError, ValueError) as exc:
        return EchoResult(False, f"cannot connect: {exc}")
    if not assoc.is_established:
        elapsed = time.perf_counter() - started
        with _lock:
            error = _connect_errors.pop(assoc.dul.ident, since=started_wall)
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            reason = REJECT_REASONS.get((rj.result_source, rj.diagnostic), f"diagnostic {rj.diagnostic}")
            return EchoResult(False, f"association rejected ({REJECT_RESULTS.get(rj.result, rj.result)}): {reason}")
        if error is None and elapsed >= timeout * 0.95:
            return EchoResult(False, f"timeout: no answer to the association request within {timeout:g} s")
        if assoc.is_aborted and error is None:
            return EchoResult(False, "association aborted by the peer")
        return EchoResult(False, _describe_connect_error(error, elapsed, timeout))
    try:
        status = assoc.send_c_echo()
        rtt_ms = (time.perf_counter() - started) * 1000
        if not status or "Status" not in status:
            return EchoResult(False, f"timeout: no C-ECHO response within {timeout:g} s")
        code = int(status.Status)
        if code == 0x0000:
            return EchoResult(True, "C-ECHO success", rtt_ms, code)
        return EchoResult(False, f"C-ECHO answered with status 0x{code:04X}", rtt_ms, code)
    finally:
        if assoc.is_established:
            assoc.release()
