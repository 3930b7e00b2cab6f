"""Q/R C-MOVE and C-GET over the wire: dcmtk movescu to a dcmtk storescp registered as a node, and getscu."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.models import Node
from tests.conftest import dcmtk, free_port, peer_env, stop_process, wait_for_port
from tests.gateway.qr_data import add_instance, dataset_bytes

STUDY, OTHER_STUDY = "1.2.826.0.1.3680043.8.498.21", "1.2.826.0.1.3680043.8.498.22"


@pytest.fixture
def archive(listener, modality, settings) -> dict:
    """One study of three instances (two CT, one MR), and another study that must never be sent."""
    Node.objects.filter(pk=modality.pk).update(allow_query_retrieve=True)  # off for a new node: granted here
    instances = [add_instance(study_uid=STUDY, instance_number=n) for n in (1, 2)]
    instances.append(add_instance(study_uid=STUDY, modality="MR", series_number=2, source="MR_small.dcm"))
    add_instance(study_uid=OTHER_STUDY, patient_id="PID9")
    paths = {i.sop_instance_uid: Path(settings.STORAGE_DIR) / i.path for i in instances}
    return {"port": listener.port, "instances": instances, "paths": paths}


@pytest.fixture
def destination(tmp_path, transactional_db):
    """A dcmtk storescp writing what it receives bit for bit (+B), registered as node ARCHIVE2."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen(
        [dcmtk("storescp"), "--aetitle", "ARCHIVE2", "--output-directory", str(out), "-uf", "+B", str(port)],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    node = Node.objects.create(name="archive-2", ae_title="ARCHIVE2", host="127.0.0.1", port=port)
    yield {"node": node, "out": out}
    stop_process(process)


def run(tool: str, port: int, *args: str) -> str:
    result = subprocess.run(
        [dcmtk(tool), "-d", "-aet", "CT1", "-aec", "ISTHMUS", "-to", "10", *args, "127.0.0.1", str(port)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout + result.stderr


def statuses(log: str) -> list[int]:
    return [int(code, 16) for code in re.findall(r"^D: DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log, re.MULTILINE)]


def counts(log: str, name: str) -> list[int]:
    """The Number of <name> Sub-operations of each C-MOVE/C-GET response, in order."""
    return [int(n) for n in re.findall(rf"^D: {name} Suboperations\s*:\s*(\d+)", log, re.MULTILINE)]


def received(directory: Path) -> dict[str, bytes]:
    return {dcmread(path).SOPInstanceUID: dataset_bytes(path) for path in directory.iterdir() if path.is_file()}


def assert_identical(archive: dict, files: dict[str, bytes]) -> None:
    assert set(files) == set(archive["paths"])
    for sop_instance_uid, data in files.items():
        assert data == dataset_bytes(archive["paths"][sop_instance_uid]), sop_instance_uid


def move_study(archive, destination_ae: str) -> str:
    """movescu the whole test study (Study Root) to `destination_ae`; returns movescu's log."""
    keys = ("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}")
    return run("movescu", archive["port"], "-S", "-aem", destination_ae, *keys)


def test_move_study_to_registered_storescp(archive, destination):
    log = move_study(archive, "ARCHIVE2")
    assert statuses(log)[-1] == 0x0000, log
    assert set(statuses(log)[:-1]) == {0xFF00}
    assert counts(log, "Remaining")[:3] == [2, 1, 0]
    assert counts(log, "Completed")[-1] == 3 and counts(log, "Failed")[-1] == 0
    assert_identical(archive, received(destination["out"]))


def test_move_series_in_patient_root(archive, destination):
    mr = archive["instances"][2]
    keys = ["-k", "QueryRetrieveLevel=SERIES", "-k", "PatientID=PID1", "-k", f"StudyInstanceUID={STUDY}"]
    keys += ["-k", f"SeriesInstanceUID={mr.series.series_instance_uid}"]
    log = run("movescu", archive["port"], "-P", "-aem", "ARCHIVE2", *keys)
    assert statuses(log)[-1] == 0x0000, log
    assert set(received(destination["out"])) == {mr.sop_instance_uid}


def test_move_to_unknown_destination_is_refused(archive, destination):
    log = move_study(archive, "NOBODY")
    assert statuses(log) == [0xA801]
    assert list(destination["out"].iterdir()) == []


def test_move_to_node_not_allowed_out_is_refused(archive, destination):
    Node.objects.filter(pk=destination["node"].pk).update(allowed_out=False)
    log = move_study(archive, "ARCHIVE2")
    assert statuses(log) == [0xA801]


def test_move_reports_failed_instances(archive, destination):
    lost = archive["instances"][1]
    archive["paths"][lost.sop_instance_uid].unlink()  # the index still names it
    log = move_study(archive, "ARCHIVE2")
    assert statuses(log)[-1] == 0xB000, log
    assert counts(log, "Completed")[-1] == 2 and counts(log, "Failed")[-1] == 1
    assert re.search(rf"\[{re.escape(lost.sop_instance_uid)}\].*FailedSOPInstanceUIDList", log)
    assert set(received(destination["out"])) == {i.sop_instance_uid for i in archive["instances"]} - {
        lost.sop_instance_uid
    }


def test_move_needs_the_unique_key(archive, destination):
    log = run(
        "movescu",
        archive["port"],
        "-S",
        "-aem",
        "ARCHIVE2",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=",
    )
    assert statuses(log) == [0xA900]
    assert list(destination["out"].iterdir()) == []


def test_move_without_permission_is_refused_before_any_sub_association(archive, destination, modality):
    Node.objects.filter(pk=modality.pk).update(allow_query_retrieve=False)
    log = move_study(archive, "ARCHIVE2")
    assert statuses(log) == [0x0124]
    assert list(destination["out"].iterdir()) == []


def get_study(archive, out) -> str:
    """getscu the whole test study into `out`; returns getscu's log."""
    keys = ("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}")
    return run("getscu", archive["port"], "-S", "+B", "-od", str(out), *keys)


def test_get_study_on_the_same_association(archive, tmp_path):
    out = tmp_path / "got"
    out.mkdir()
    log = get_study(archive, out)
    assert statuses(log)[-1] == 0x0000, log
    assert counts(log, "Completed")[-1] == 3
    assert_identical(archive, received(out))


def test_get_image_level_by_uid_list(archive, tmp_path):
    out = tmp_path / "got"
    out.mkdir()
    ct1, _, mr = archive["instances"]
    keys = ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={STUDY}"]
    keys += [
        "-k",
        f"SeriesInstanceUID={ct1.series.series_instance_uid}",
        "-k",
        f"SOPInstanceUID={ct1.sop_instance_uid}",
    ]
    log = run("getscu", archive["port"], "-S", "+B", "-od", str(out), *keys)
    assert statuses(log)[-1] == 0x0000, log
    assert set(received(out)) == {ct1.sop_instance_uid}
    assert mr.sop_instance_uid not in received(out)


def test_get_without_permission_is_refused(archive, modality, tmp_path):
    Node.objects.filter(pk=modality.pk).update(allow_query_retrieve=False)
    out = tmp_path / "got"
    out.mkdir()
    log = get_study(archive, out)
    assert statuses(log) == [0x0124]
    assert list(out.iterdir()) == []
