"""`manage.py dimse` as its own process: SIGTERM lets open associations finish, then it exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.models import Heartbeat, Node
from tests.conftest import ROOT, free_port, peer_env, stop_process, wait_for_port


def test_sigterm_finishes_open_association_then_exits(transactional_db):
    Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", port=104)
    port = free_port()
    listener = subprocess.Popen(
        [sys.executable, "manage.py", "dimse", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=peer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, process=listener)
        beating = Heartbeat.objects.filter(kind="dimse", address=f"ISTHMUS@127.0.0.1:{port}")
        deadline = time.monotonic() + 10  # the first beat is written just after the port opens
        while not beating.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beating.exists()
        scu = AE(ae_title="CT1")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="ISTHMUS")
        assert assoc.is_established

        listener.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert listener.poll() is None, "the listener waits for the open association"
        refused = scu.associate("127.0.0.1", port, ae_title="ISTHMUS")
        assert not refused.is_established, "no new associations once stopping"
        assert assoc.send_c_echo().Status == 0x0000, "the open association is still served"
        assoc.release()

        assert listener.wait(timeout=10) == 0
        output = listener.stdout.read()
        assert "DIMSE listener stopped" in output
        assert not Heartbeat.objects.filter(kind="dimse").exists()
    finally:
        stop_process(listener)


def test_several_listener_processes_share_the_port_and_stop_together(transactional_db):
    Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", port=104)
    port = free_port()
    listener = subprocess.Popen(
        [sys.executable, "manage.py", "dimse", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"],
        cwd=ROOT,
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=listener)
        beating = Heartbeat.objects.filter(kind="dimse", address=f"ISTHMUS@127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while beating.count() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beating.count() == 2, "two processes, two heartbeats"

        scu = AE(ae_title="CT1")
        scu.add_requested_context(Verification)
        for _ in range(12):  # the kernel spreads connections over both processes
            assoc = scu.associate("127.0.0.1", port, ae_title="ISTHMUS")
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()

        listener.send_signal(signal.SIGTERM)
        assert listener.wait(timeout=20) == 0
        deadline = time.monotonic() + 10
        while beating.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not beating.exists(), "both processes stopped and removed their heartbeats"
    finally:
        stop_process(listener)
