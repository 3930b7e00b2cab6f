"""C-STORE held to the store's limits while it arrives: the per-instance cap and the free-space watermark.

dcmtk's storescu (--no-halt) sends a refused instance and a small one on one
association: the first is answered A7xx with nothing kept, the second is stored.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.models import Instance
from tests.conftest import free_port
from tests.gateway.dimse_peer import can_mount_tmpfs, files_under, listener_process
from tests.gateway.instances import (
    assert_stored_as_sent,
    dataset_bytes,
    make_instance,
    multiframe_mr,
    sop_uid_of,
    storescu,
)

MIB = 1024 * 1024


def store_responses(result) -> list[str]:
    """Each C-STORE response storescu received, in order, as its status text ("Success", "Refused: OutOfResources")."""
    return re.findall(r"Received Store Response \((.*?)\)", result.stderr)


def refused_after(log: Path) -> int:
    """The bytes received before the refusal, from the listener's one line about it."""
    [received] = re.findall(r"refused \(0x[0-9A-F]{4}\) after (\d+) bytes", log.read_text())
    return int(received)


def test_instance_past_the_cap_is_refused_and_the_association_goes_on(modality, settings, tmp_path):
    port, log, storage = free_port(), tmp_path / "listener.log", tmp_path / "storage"
    settings.STORAGE_DIR = storage  # where the listener keeps what it stores, for the checks here
    large = multiframe_mr(tmp_path / "mr", frames=200)  # 1.6 MB of pixel data
    small = make_instance("CT_small.dcm", tmp_path / "ct")
    with listener_process(port, log, ISTHMUS_MAX_INSTANCE_MB="1", ISTHMUS_STORAGE_DIR=str(storage)):
        result = storescu(port, [large, small], "--no-halt")
        assert store_responses(result) == ["Refused: OutOfResources", "Success"], result.stderr
        assert files_under(storage / ".tmp") == []
    assert not Instance.objects.filter(sop_instance_uid=sop_uid_of(large)).exists()
    assert_stored_as_sent(small)
    assert MIB < refused_after(log) <= MIB + 16384, "refused as soon as it passed the cap, not at the end"
    assert "refused (0xA702)" in log.read_text() and "(ISTHMUS_MAX_INSTANCE_MB)" in log.read_text()


def test_free_space_is_watched_during_a_receive(modality, tmp_path):
    """A 48 MB volume, a 16 MB watermark, a 64 MB instance: refused once the disk gets low, mid-receive."""
    if not can_mount_tmpfs():  # a real small disk is the only honest way to fill one; never skipped silently
        pytest.fail(
            "cannot mount a small tmpfs: enable user namespaces (unshare --mount --map-root-user) or run as root"
        )
    port, log, storage = free_port(), tmp_path / "listener.log", tmp_path / "volume"
    large = multiframe_mr(tmp_path / "mr", frames=8000)  # 64 MB
    small = make_instance("CT_small.dcm", tmp_path / "ct")
    with listener_process(
        port, log, tmpfs=(storage, 48), ISTHMUS_STORAGE_DIR=str(storage), ISTHMUS_MIN_FREE_MB="16"
    ) as listener:
        result = storescu(port, [large, small], "--no-halt")
        assert store_responses(result) == ["Refused: OutOfResources", "Success"], result.stderr
        volume = Path(f"/proc/{listener.pid}/root") / storage.relative_to("/")
        assert files_under(volume / ".tmp") == [], "the partial file was removed"
        [kept] = files_under(volume)
        assert dataset_bytes(kept) == dataset_bytes(small), "the small instance is stored, and only it"
    assert not Instance.objects.filter(sop_instance_uid=sop_uid_of(large)).exists()
    assert Instance.objects.filter(sop_instance_uid=sop_uid_of(small)).exists()
    assert 24 * MIB < refused_after(log) < 40 * MIB, "refused when free space fell below 16 MB, not before or after"
    assert "refused (0xA700)" in log.read_text() and "below ISTHMUS_MIN_FREE_MB" in log.read_text()
