"""A deflate bomb over C-STORE: dcmtk storescu sends it to the DIMSE listener running as its own process.

The bomb is a valid Deflated Explicit VR Little Endian instance whose Pixel Data are 1 GiB of zeros, about
1 MB on the wire. Before, the listener inflated it whole into memory (+2.0 GiB) and stored it.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.models import Instance
from tests.conftest import ROOT, free_port, peer_env, stop_process, wait_for_port
from tests.gateway.bombs import deflated_bomb
from tests.gateway.instances import PATIENT_ID, PATIENT_NAME, dataset_bytes, make_instance, stored_files, temp_files
from tests.gateway.instances import storescu as dcmtk_storescu
from tests.memory import MB, PeakGrowth

pytestmark = pytest.mark.django_db(transaction=True)

# The listener's own growth while it receives 1 MB and inflates part of it: the received data set goes to a
# file, and inflating holds 1 MiB of output at a time. 50 MB is the 20 MB PDU bound of issue 11 plus room for
# allocator noise; the unprotected listener grew by 2 GiB.
RSS_BOUND = 50 * MB


@dataclass
class Dimse:
    process: subprocess.Popen
    port: int
    storage: Path
    log: Path


@pytest.fixture
def dimse(modality, tmp_path) -> Iterator[Dimse]:
    """`manage.py dimse` as its own process (one listener process), its log in a file."""
    port, storage, log = free_port(), tmp_path / "storage", tmp_path / "dimse.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "dimse", "--host", "127.0.0.1", "--port", str(port), "--processes", "1"],
            env=peer_env(ISTHMUS_STORAGE_DIR=str(storage)),
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process=process)
        yield Dimse(process, port, storage, log)
    finally:
        stop_process(process)


def storescu(dimse: Dimse, path: Path) -> subprocess.CompletedProcess:
    """storescu proposing Deflated Explicit VR Little Endian (-xd), as a modality configured to deflate."""
    return dcmtk_storescu(dimse.port, [path], "-xd", "+cl", "9")


def inflated(data_set: bytes) -> bytes:
    return zlib.decompress(data_set, -zlib.MAX_WBITS)


def test_a_deflated_instance_is_stored_as_received_and_a_deflate_bomb_refused(dimse, tmp_path):
    legitimate = make_instance("image_dfl.dcm", tmp_path / "sent")
    sent = storescu(dimse, legitimate)  # also warms the listener up: its imports are not the bomb's cost
    assert sent.returncode == 0 and "Success" in sent.stderr, sent.stderr
    row = Instance.objects.get()
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1.99" and (row.rows, row.columns) == (512, 512)
    (stored,) = stored_files(dimse.storage)
    # dcmtk deflates again as it sends: what was stored is what came over the wire, the same data set inflated.
    assert inflated(dataset_bytes(stored)) == inflated(dataset_bytes(legitimate))
    bomb = deflated_bomb(tmp_path / "sent")
    bomb_uid = str(dcmread(bomb, stop_before_pixels=True).SOPInstanceUID)
    growth = PeakGrowth(dimse.process.pid)

    refused = storescu(dimse, bomb)

    assert "Received Store Response (Error: CannotUnderstand)" in refused.stderr, refused.stderr  # dcmtk's 0xCxxx
    assert growth.bytes() < RSS_BOUND, f"the listener grew by {growth.bytes() / MB:.0f} MB"
    assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [row.sop_instance_uid]
    assert stored_files(dimse.storage) == [stored] and temp_files(dimse.storage) == []
    log = dimse.log.read_text()
    refusals = [line for line in log.splitlines() if bomb_uid in line]
    assert len(refusals) == 1 and "0xC000" in refusals[0] and "ISTHMUS_MAX_INFLATE_RATIO" in refusals[0], log
    assert PATIENT_NAME not in log and PATIENT_ID not in log
