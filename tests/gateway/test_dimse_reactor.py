"""The waking reactor: pynetdicom's 1 ms polling sleeps end as soon as there is work."""

from __future__ import annotations

import gc
import os
import time

from pynetdicom import AE, association, dul
from pynetdicom.sop_class import Verification

from gateway.dimse import reactor


def test_pynetdicom_modules_use_the_waking_clock():
    assert reactor.installed()
    assert association.time.sleep is reactor._sleep and dul.time.sleep is reactor._sleep
    assert association.time.time is time.time  # everything else is the real time module


def test_a_served_association_is_woken_by_its_eventfd_and_gives_it_back(listener, modality):
    scu = AE(ae_title="CT1")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", listener.port, ae_title="ISTHMUS")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo().Status for _ in range(50)]
        assert statuses == [0x0000] * 50
        [served] = [a for a in listener.ae.active_associations if a.is_acceptor]
        wake = served.dul._isthmus_wakeup
        assert os.fstat(wake)  # an open eventfd
        assert served.dul.to_provider_queue.put.__name__ == "put_and_wake"
        assert served.dimse.get_msg.__name__ == "get_msg" and "get_msg" in served.dimse.__dict__  # the guarded read
    finally:
        assoc.release()
    deadline = time.monotonic() + 10
    while listener.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    del served
    gc.collect()
    try:
        os.fstat(wake)
        closed = False
    except OSError:
        closed = True
    assert closed, "the eventfd of a finished association must be closed"


def test_the_reactor_leaves_a_response_to_the_send_call_that_cleared_its_checkpoint(listener, modality):
    """The pynetdicom race: a message queued while a send_*() holds the reactor is not the reactor's to take."""
    scu = AE(ae_title="CT1")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", listener.port, ae_title="ISTHMUS")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000  # the requestor's reactor has run: its read is guarded
        assert "get_msg" in assoc.dimse.__dict__
        assoc._reactor_checkpoint.clear()  # what send_c_store() does before it sends; the real reactor now waits
        assoc.dimse.msg_queue.put((1, "the response"))
        assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's non-blocking read leaves it
        assert assoc.dimse.get_msg(True) == (1, "the response")  # the sender's blocking read gets it
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
