"""Wake pynetdicom's reactor threads when there is work, instead of after a fixed 1 ms sleep.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps
`_run_loop_delay` (1 ms) whenever a loop found nothing to do, and the
association thread sleeps a fixed 1 ms before each look at its message queue.
Every C-STORE crosses both loops, so a synchronous sender such as storescu
waited about a millisecond per instance for nothing (bare pynetdicom: 290
small instances/s with those sleeps, 430/s with 0.1 ms ones). Shorter sleeps
burn CPU that concurrent associations need, so the sleeps become waits that
end early on work:

- the association thread waits on its DIMSE message queue's condition, which
  the DUL thread notifies when it queues a decoded message;
- the DUL thread waits in select() on its socket and an eventfd that is
  written when the association thread queues a primitive to send.

Both still return after the original 1 ms at most, so timers behave as before.
pynetdicom has no hook for this: the `time` module both modules use is
replaced by a stand-in whose sleep() does the waiting (pinned to pynetdicom
3.0.4; tests/gateway/test_dimse_reactor.py checks it).
"""

from __future__ import annotations

import os
import select
import threading
import time
import types
import weakref

from pynetdicom import association, dul

REACTOR_SLEEP = 0.001  # pynetdicom's association-loop sleep and default DUL _run_loop_delay


def _sleep(seconds: float) -> None:
    if seconds == REACTOR_SLEEP:
        thread = threading.current_thread()
        if isinstance(thread, dul.DULServiceProvider):
            return _dul_wait(thread, seconds)
        if isinstance(thread, association.Association) and thread.dimse is not None:
            return _association_wait(thread, seconds)
    time.sleep(seconds)


def _association_wait(assoc: association.Association, timeout: float) -> None:
    """Until a DIMSE message is queued for this association, or `timeout`."""
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(timeout)


def _dul_wait(provider: dul.DULServiceProvider, timeout: float) -> None:
    """Until the peer sends data, the association queues a primitive to send, or `timeout`."""
    sock = getattr(provider.socket, "socket", None)
    wake = _wakeup_fd(provider)
    if sock is None or wake is None:
        time.sleep(timeout)
        return
    try:
        readable, _, _ = select.select([sock, wake], [], [], timeout)
    except (OSError, ValueError):  # the socket closed under us: the DUL loop notices next
        return
    if wake in readable:
        try:
            os.eventfd_read(wake)
        except BlockingIOError:
            pass


def _wakeup_fd(provider: dul.DULServiceProvider) -> int | None:
    """The DUL's eventfd, created on first use; to_provider_queue.put() writes to it."""
    wake = provider.__dict__.get("_isthmus_wakeup")
    if wake is not None or not hasattr(os, "eventfd"):
        return wake
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    weakref.finalize(provider, os.close, wake)
    outgoing = provider.to_provider_queue
    put = outgoing.put

    def put_and_wake(item, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        try:
            os.eventfd_write(wake, 1)
        except OSError:  # closed at shutdown: nobody is waiting any more
            pass

    outgoing.put = put_and_wake  # an instance attribute: items already queued are unaffected
    provider._isthmus_wakeup = wake
    return wake


_clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
_clock.sleep = _sleep


def install() -> None:
    """Give pynetdicom's association and DUL modules the waking sleep (idempotent)."""
    association.time = _clock
    dul.time = _clock


def installed() -> bool:
    return association.time is _clock and dul.time is _clock
