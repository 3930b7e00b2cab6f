"""HL7 fixtures: the RIS registered as a sender, and our listener on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.models import Hl7Sender
from worklist.hl7.listener import Hl7Listener


@pytest.fixture
def hl7_sender(transactional_db) -> Hl7Sender:
    """The RIS, registered as the only HL7 sender: any message type, from 127.0.0.1."""
    return Hl7Sender.objects.create(name="ris", host="127.0.0.1")


@pytest.fixture
def hl7_listener(hl7_sender) -> Iterator[Hl7Listener]:
    """Our HL7 listener on a free loopback port, applying to this test's database; the RIS may send."""
    listener = Hl7Listener("127.0.0.1", 0, idle_timeout=30)
    listener.start()
    yield listener
    listener.stop(grace=5)
