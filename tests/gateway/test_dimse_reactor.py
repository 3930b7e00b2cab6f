"""The adaptive reactor sleep: short while an association is busy, pynetdicom's 1 ms once it is idle."""

from __future__ import annotations

import time

from pynetdicom import AE, association, dul
from pynetdicom.sop_class import Verification

from gateway.dimse import reactor


def test_pynetdicom_modules_use_the_adaptive_clock():
    assert reactor.installed()
    assert association.time.sleep is reactor._sleep and dul.time.sleep is reactor._sleep
    assert association.time.time is time.time  # everything else is the real time module


def test_an_association_is_busy_right_after_a_pdu_and_idle_later(listener, modality):
    scu = AE(ae_title="CT1")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", listener.port, ae_title="ISTHMUS")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        [served] = [a for a in listener.ae.active_associations if a.is_acceptor]
        assert reactor.busy(served.dul) and reactor.busy(served)  # the DUL thread and the association thread
        deadline = time.monotonic() + 5
        while reactor.busy(served) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not reactor.busy(served)
        assert time.monotonic() < deadline
    finally:
        assoc.release()
