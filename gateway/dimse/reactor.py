"""Poll pynetdicom's reactors fast while an association is busy, at pynetdicom's pace when it is idle.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps
`_run_loop_delay` (1 ms) whenever a loop found nothing to do, and the
association thread sleeps a fixed 1 ms before each look at its message queue.
Each C-STORE crosses both loops, so a synchronous sender such as storescu waits
about a millisecond per instance for nothing: bare pynetdicom received 290 small
instances/s with 1 ms sleeps and 430/s with 0.1-0.2 ms ones (see
docs/benchmarks.md). Polling fast forever would burn CPU on idle associations,
so the short sleep applies only within BUSY_WINDOW of the last PDU received.

pynetdicom has no hook for this: the `time` module both modules use is
replaced by a stand-in whose sleep() shortens exactly those 1 ms sleeps
(pinned to pynetdicom 3.0.4; tests/gateway/test_dimse_reactor.py checks it).
"""

from __future__ import annotations

import threading
import time
import types

from pynetdicom import association, dul

REACTOR_SLEEP = 0.001  # pynetdicom's fixed association-loop sleep and default DUL _run_loop_delay
BUSY_SLEEP = 0.0001
BUSY_WINDOW = 0.05  # seconds since the last PDU during which an association counts as busy


def busy(thread: threading.Thread | None = None) -> bool:
    """True when the association that `thread` (a DUL or an association thread) serves received a PDU just now."""
    thread = thread or threading.current_thread()
    provider = thread if isinstance(thread, dul.DULServiceProvider) else getattr(thread, "dul", None)
    last_pdu = getattr(getattr(provider, "_idle_timer", None), "_start_time", None)
    return last_pdu is not None and time.time() - last_pdu < BUSY_WINDOW


def _sleep(seconds: float) -> None:
    time.sleep(BUSY_SLEEP if seconds == REACTOR_SLEEP and busy() else seconds)


_clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
_clock.sleep = _sleep


def install() -> None:
    """Give pynetdicom's association and DUL modules the adaptive sleep (idempotent)."""
    association.time = _clock
    dul.time = _clock


def installed() -> bool:
    return association.time is _clock and dul.time is _clock
