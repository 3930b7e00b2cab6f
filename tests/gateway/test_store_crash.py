"""Crash test: the listener is SIGKILLed while storescu streams to it; what was acknowledged survives, intact.

A real `manage.py dimse` process shares the test database; after each kill it
is restarted (sweeping its temp files) and the store is checked against what
storescu logged as successfully stored.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway import store
from gateway.models import Instance
from tests.conftest import ROOT, dcmtk, free_port, peer_env, stop_process, wait_for_port
from tests.gateway.instances import assert_stored_as_sent, dataset_bytes, make_instance, sha256, temp_files

ROUNDS = 3
FILES_PER_ROUND = 80


@pytest.fixture
def storage(settings, tmp_path) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


def start_listener(port: int, storage: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "dimse", "--host", "127.0.0.1", "--port", str(port)],
        env=peer_env(ISTHMUS_STORAGE_DIR=str(storage)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    wait_for_port(port, process=process)
    return process


def start_storescu(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "CT1", "-aec", "ISTHMUS", "-to", "10", "127.0.0.1", str(port)]
        + [str(path) for path in files],
        env=peer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def acknowledged(log: str) -> set[Path]:
    """The files storescu logged a success response for."""
    done, sending = set(), None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and sending is not None:
            done.add(sending)
    return done


def check_store(storage: Path, sent: list[Path], confirmed: set[Path]) -> None:
    """Acknowledged = stored and indexed; every row has its whole file; no partial file anywhere."""
    for path in confirmed:
        assert_stored_as_sent(path)
    indexed = set()
    for instance in Instance.objects.all():
        stored = store.instance_path(instance)
        assert stored.is_file() and sha256(stored) == instance.sha256, f"row without its file: {instance}"
        indexed.add(stored)
    whole = {dataset_bytes(path) for path in sent}
    for stored in storage.rglob("*.dcm"):
        if ".tmp" in stored.relative_to(storage).parts or stored in indexed:
            continue
        # Killed between rename and commit: unacknowledged, complete, and overwritten by the resend.
        assert dataset_bytes(stored) in whole, f"partial file in the store: {stored}"
    assert temp_files(storage) == [], "the restart did not sweep the temp files"


def test_sigkill_mid_stream_loses_nothing_acknowledged(modality, storage, tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    port = free_port()
    study_uid = generate_uid()
    sent: list[Path] = []
    confirmed: set[Path] = set()
    for round_number in range(ROUNDS):
        files = [
            make_instance("MR_small.dcm", tmp_path / f"round-{round_number}", study_uid=study_uid, InstanceNumber=n)
            for n in range(FILES_PER_ROUND)
        ]
        sent += files
        listener = start_listener(port, storage)
        sender = start_storescu(port, files)
        time.sleep(rng.uniform(0.1, 0.6))
        listener.send_signal(signal.SIGKILL)
        listener.wait(10)
        log, _ = sender.communicate(timeout=30)
        confirmed |= acknowledged(log)
        listener = start_listener(port, storage)  # the restart sweeps the dead listener's temp files
        try:
            check_store(storage, sent, confirmed)
        finally:
            stop_process(listener)
    assert 0 < len(confirmed) < len(sent), f"seed {seed}: no kill landed mid-stream ({len(confirmed)} acknowledged)"
    # Resending everything completes the store: every file once, each intact.
    listener = start_listener(port, storage)
    try:
        resend = start_storescu(port, sent)
        log, _ = resend.communicate(timeout=60)
        assert acknowledged(log) == set(sent), log[-2000:]
    finally:
        stop_process(listener)
    check_store(storage, sent, set(sent))
    assert Instance.objects.count() == len(sent)
