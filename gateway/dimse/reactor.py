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
The same stand-in closes a pynetdicom race in which the reactor takes the
response a send_*() call on another thread is waiting for
(_guard_reactor_reads); C-FIND handlers call let_the_peer_speak() so that a
peer's C-CANCEL is read while answers are still queued.
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

from gateway.dimse import guard

REACTOR_SLEEP = 0.001  # pynetdicom's association-loop sleep and default DUL _run_loop_delay
# Before its A-ASSOCIATE-RQ a connection's DUL waits only for the peer's bytes (the socket wakes it) or
# ARTIM (seconds): polling every 1 ms there let a few hundred silent connections take the CPU.
AWAITING_REQUEST_WAIT = 0.05


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
    if "get_msg" not in assoc.dimse.__dict__:
        _guard_reactor_reads(assoc)
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(timeout)
        if messages.queue:
            # Queue.put() wakes one waiter, the oldest: this loop may have taken the wake-up meant for a
            # send_*() blocked in get() for its response, which would then sleep out its DIMSE timeout.
            messages.not_empty.notify()


def _guard_reactor_reads(assoc: association.Association) -> None:
    """Keep the reactor from taking a message meant for a send_*() call in progress on another thread.

    pynetdicom's reactor passes its checkpoint, then reads the message queue
    without blocking; a send_c_store() that cleared the checkpoint in between
    (it saw the reactor's stale "paused" flag) has its response taken by the
    reactor, which logs "unexpected C-STORE service message", and then waits
    out its DIMSE timeout (seen when forwarding under load). A response can
    only be queued after its request, so its sender cleared the checkpoint
    before the response is in the queue: when the reactor sees a message and
    then a cleared checkpoint, the message is left to the sender.
    """
    dimse = assoc.dimse
    read = dimse.get_msg

    def get_msg(block: bool = False):
        if not block:  # only the reactor loop reads without blocking; every send_*() blocks
            with dimse.msg_queue.mutex:
                waiting = bool(dimse.msg_queue.queue)
            if not waiting or not assoc._reactor_checkpoint.is_set():
                return None, None
        return read(block)

    dimse.get_msg = get_msg  # an instance attribute, read by the reactor loop on its next pass


def _dul_wait(provider: dul.DULServiceProvider, timeout: float) -> None:
    """Until the peer sends data, the association queues a primitive to send, or `timeout`."""
    sock = getattr(provider.socket, "socket", None)
    wake = _wakeup_fd(provider)
    if guard.awaiting_request(provider):
        timeout = AWAITING_REQUEST_WAIT
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


def let_the_peer_speak(assoc: association.Association, limit: float = 0.05) -> None:
    """Between C-FIND answers: if the peer has sent something (a C-CANCEL), let the DUL read it.

    pynetdicom's DUL sends every queued PDU before it reads the socket, so a
    handler that keeps yielding answers keeps a C-CANCEL unread until the last
    answer is out. When the socket has data, pause (at most `limit`) until the
    send queue is empty, then one loop of the DUL reads what the peer sent.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is None:
        return
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return
    if not readable:
        return
    deadline = time.monotonic() + limit
    while assoc.dul.to_provider_queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.0005)
    time.sleep(0.002)


_clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
_clock.sleep = _sleep


def install() -> None:
    """Give pynetdicom's association and DUL modules the waking sleep (idempotent)."""
    association.time = _clock
    dul.time = _clock


def installed() -> bool:
    return association.time is _clock and dul.time is _clock
