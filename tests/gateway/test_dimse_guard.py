"""The DIMSE port's guard: pinned to the pynetdicom it was written against, and its limits as plain functions."""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging

import pynetdicom
import pytest
from pynetdicom import association, dimse, dimse_messages, dul, presentation, transport

from gateway.dimse import guard
from gateway.dimse.admission import Admission, KnownHosts
from gateway.logthrottle import Throttled

# The pynetdicom 3.0.4 code guard.py replaces, copies or relies on (see its docstring). A change here
# means pynetdicom changed under the guard: review gateway/dimse/guard.py, then update the digest.
PINNED_SOURCES = {
    (dul, "DULServiceProvider._read_pdu_data"): "19f2d4e38c13c835",
    (dul, "DULServiceProvider._decode_pdu"): "fc71dd1bf853e1ce",
    (dul, "DULServiceProvider.run_reactor"): "e3a10eb3a0931e48",
    (dimse, "DIMSEServiceProvider.receive_primitive"): "5f99c86b14a15cef",
    (dimse_messages, "DIMSEMessage.decode_msg"): "f51c777e841a76be",
    (transport, "RequestHandler.handle"): "034823fb4df3a874",
    (transport, "RequestHandler._create_association"): "05c8d12b79863cdb",
    (association, "Association.run_reactor"): "ed8bbbe3b3d6ddae",
    (association, "Association._abort_blocking"): "10b43ef8c63c6764",
    (presentation, "PresentationContext.__init__"): "37a8842ac07cd8f3",
}


def original_source(module, qualname: str) -> str:
    """The source of `qualname` as pynetdicom ships it (read from its file: the class may hold our replacement)."""
    source = inspect.getsource(module)
    class_name, function_name = qualname.split(".")
    [klass] = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == class_name]
    [function] = [node for node in klass.body if isinstance(node, ast.FunctionDef) and node.name == function_name]
    return "\n".join(source.splitlines()[function.lineno - 1 : function.end_lineno]) + "\n"


def test_guard_is_installed_on_the_pynetdicom_it_was_written_for():
    assert pynetdicom.__version__ == guard.PINNED
    assert guard.installed()
    for (module, qualname), digest in PINNED_SOURCES.items():
        found = hashlib.sha256(original_source(module, qualname).encode()).hexdigest()[:16]
        assert found == digest, f"pynetdicom's {qualname} changed: review gateway/dimse/guard.py"


def test_pdu_bounds_follow_what_we_advertised():
    class Side:
        maximum_length = 131072

    class Assoc:
        is_acceptor, acceptor, requestor = True, Side(), None

    assert guard.pdu_bound(Assoc(), 0x04) == 131072 + guard.DATA_MARGIN
    Side.maximum_length = 0  # ISTHMUS_DIMSE_MAX_PDU=0: pynetdicom's "no limit" still has one here
    assert guard.pdu_bound(Assoc(), 0x04) == guard.UNLIMITED_PDU + guard.DATA_MARGIN
    assert guard.pdu_bound(Assoc(), 0x01) == guard.ASSOCIATE_BOUND  # PS3.8: the max PDU binds P-DATA-TF only
    assert guard.pdu_bound(Assoc(), 0x07) == guard.FIXED_BOUND


class Known(KnownHosts):
    def __init__(self, *addresses: str) -> None:
        super().__init__()
        self._addresses = frozenset(addresses)


def test_admission_caps_per_address_and_in_all_keeping_a_quarter_for_registered_hosts():
    admission = Admission(total=8, per_host=3, known=Known("10.0.0.1"))
    assert admission.reserved == 2
    assert [admission.admit("10.9.9.9") for _ in range(4)] == [True, True, True, False]  # per address
    assert [admission.admit(f"10.9.9.{n}") for n in range(10, 14)] == [True, True, True, False]  # 6 of 8 for unknown
    assert [admission.admit("::ffff:10.0.0.1") for _ in range(3)] == [True, True, False]  # the reserve, then full
    admission.release("10.9.9.9")
    assert admission.open("10.9.9.9") == 2 and admission.open() == 7
    assert admission.admit("10.0.0.1")


def test_admission_without_registered_hosts_reserves_nothing():
    admission = Admission(total=4, per_host=4, known=Known())
    assert [admission.admit("10.9.9.9") for _ in range(5)] == [True] * 4 + [False]


def test_a_flood_of_events_is_one_line_per_interval(caplog):
    throttled = Throttled(logging.getLogger("isthmus.test"), interval=60)
    with caplog.at_level(logging.INFO, logger="isthmus.test"):
        written = [throttled.warning("cap", "refused %s", n) for n in range(1000)]
        throttled.warning("other", "a different kind")
    assert written.count(True) == 1
    assert [record.getMessage() for record in caplog.records] == ["refused 0", "a different kind"]


def test_the_folded_count_is_in_the_next_line(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 100.0])
    monkeypatch.setattr("gateway.logthrottle.time.monotonic", lambda: next(clock))
    throttled = Throttled(logging.getLogger("isthmus.test"), interval=60)
    with caplog.at_level(logging.INFO, logger="isthmus.test"):
        for _ in range(4):
            throttled.warning("cap", "refused")
    assert [record.getMessage() for record in caplog.records] == [
        "refused",
        "refused (and 2 more like it since the last such line)",
    ]


@pytest.mark.parametrize("name", guard.PEER_DATA_LOGGERS)
def test_pynetdicom_tracebacks_for_peer_data_are_one_line(name, caplog):
    with caplog.at_level(logging.ERROR, logger=name):
        try:
            b"\xff".decode("ascii")
        except UnicodeDecodeError as exc:
            logging.getLogger(name).exception(exc)
    [record] = caplog.records
    assert record.exc_info is None and record.getMessage().startswith("UnicodeDecodeError: 'ascii' codec")
