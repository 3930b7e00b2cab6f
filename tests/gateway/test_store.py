"""store.save(), the one write path: files, index rows, duplicates, refusals, the temp area and its sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connection
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway import store
from gateway.dimse.status import Status
from gateway.models import AuditEvent, Instance, Patient, Series, Study
from tests.gateway.instances import (
    PATIENT_ID,
    PATIENT_NAME,
    assert_stored_as_sent,
    dataset_bytes,
    make_instance,
    sha256,
    stored_files,
    temp_files,
)


@pytest.fixture
def storage(settings, tmp_path, transactional_db) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


def save(path: Path, **options) -> store.StoreResult:
    with open(path, "rb") as stream:
        return store.save(source=stream, calling_ae=options.pop("calling_ae", "CT1"), **options)


def test_stream_is_stored_indexed_and_durable(storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path, AccessionNumber="ACC-1", InstanceNumber=3)
    result = save(path, called_ae="ISTHMUS", origin="stow")
    assert (result.status, result.outcome) == (Status.SUCCESS, "stored")
    instance = assert_stored_as_sent(path)
    assert instance.source == "stow" and instance.called_ae == "ISTHMUS" and instance.instance_number == 3
    assert instance.series.study.accession_number == "ACC-1" and instance.series.study.study_date == "20040119"
    assert instance.series.study.patient.patient_name == PATIENT_NAME
    assert temp_files(storage) == []


def test_path_in_temp_area_is_moved_not_copied(storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    temp = store.temp_dir() / "received.dcm"
    temp.write_bytes(path.read_bytes())
    inode = temp.stat().st_ino
    assert store.save(source=temp, calling_ae="CT1").ok
    assert not temp.exists()
    assert store.instance_path(Instance.objects.get()).stat().st_ino == inode


def test_path_outside_temp_area_is_a_programming_error(storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    with pytest.raises(ValueError, match="temp area"):
        store.save(source=path)
    assert path.exists()


def test_identical_duplicate_changes_nothing(storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    assert save(path).outcome == "stored"
    stored = store.instance_path(Instance.objects.get())
    before = stored.stat().st_mtime_ns
    result = save(path)
    assert (result.status, result.outcome) == (Status.SUCCESS, "duplicate")
    assert Instance.objects.count() == 1 and not AuditEvent.objects.exists()
    assert stored.stat().st_mtime_ns == before and len(stored_files(storage)) == 1


def _two_versions(tmp_path) -> tuple[Path, Path, str]:
    sop_uid, study_uid, series_uid = generate_uid(), generate_uid(), generate_uid()
    uids = {"sop_uid": sop_uid, "study_uid": study_uid, "series_uid": series_uid}
    first = make_instance("CT_small.dcm", tmp_path / "first", **uids)
    second = make_instance("CT_small.dcm", tmp_path / "second", SeriesDescription="re-sent", **uids)
    return first, second, sop_uid


def test_different_bytes_keep_first(storage, tmp_path, settings):
    settings.DUPLICATE_POLICY = "keep-first"
    first, second, sop_uid = _two_versions(tmp_path)
    save(first)
    result = save(second)
    assert (result.status, result.outcome) == (Status.SUCCESS, "kept-first")
    assert_stored_as_sent(first)
    audit = AuditEvent.objects.get()
    assert (audit.action, audit.target, audit.actor) == ("store.duplicate.kept-first", sop_uid, "CT1")
    assert sha256(first) in audit.detail and sha256(second) in audit.detail
    assert PATIENT_NAME not in audit.detail and PATIENT_ID not in audit.detail


def test_different_bytes_replace(storage, tmp_path, settings):
    settings.DUPLICATE_POLICY = "replace"
    first, second, sop_uid = _two_versions(tmp_path)
    save(first)
    old_file = store.instance_path(Instance.objects.get())
    result = save(second)
    assert (result.status, result.outcome) == (Status.SUCCESS, "replaced")
    instance = Instance.objects.get()
    assert dataset_bytes(store.instance_path(instance)) == dataset_bytes(second)
    assert instance.sha256 == sha256(store.instance_path(instance))
    assert not old_file.exists() and len(stored_files(storage)) == 1
    assert AuditEvent.objects.get().action == "store.duplicate.replaced"


def test_different_bytes_reject(storage, tmp_path, settings):
    settings.DUPLICATE_POLICY = "reject"
    first, second, sop_uid = _two_versions(tmp_path)
    save(first)
    result = save(second)
    assert (result.status, result.outcome) == (Status.DUPLICATE_SOP_INSTANCE, "rejected")
    assert_stored_as_sent(first)
    assert AuditEvent.objects.get().action == "store.duplicate.rejected"
    assert temp_files(storage) == []


def test_missing_file_is_repaired_by_a_resend(storage, tmp_path, settings):
    settings.DUPLICATE_POLICY = "reject"
    path = make_instance("CT_small.dcm", tmp_path)
    save(path)
    store.instance_path(Instance.objects.get()).unlink()
    result = save(path)
    assert result.ok and result.outcome == "replaced"
    assert_stored_as_sent(path)


@pytest.mark.parametrize(
    ("damage", "status"),
    [
        ("truncated", Status.CANNOT_UNDERSTAND),
        ("garbage", Status.CANNOT_UNDERSTAND),
        ("no-study-uid", Status.CANNOT_UNDERSTAND),
        ("path-in-uid", Status.CANNOT_UNDERSTAND),
        ("class-mismatch", Status.DATASET_MISMATCH),
        ("instance-mismatch", Status.DATASET_MISMATCH),
    ],
)
def test_bad_input_gets_its_status_and_leaves_nothing(storage, tmp_path, damage, status):
    path = _damaged(damage, tmp_path)
    result = save(path)
    assert result.status == status, result.reason
    assert PATIENT_NAME not in result.reason and PATIENT_ID not in result.reason
    assert not Instance.objects.exists() and not Study.objects.exists() and not Patient.objects.exists()
    assert stored_files(storage) == [] and temp_files(storage) == []


def _damaged(damage: str, tmp_path: Path) -> Path:
    if damage == "path-in-uid":
        return make_instance("CT_small.dcm", tmp_path, series_uid="../../../tmp/evil")
    if damage == "no-study-uid":
        return make_instance("CT_small.dcm", tmp_path, StudyInstanceUID="")
    path = make_instance("CT_small.dcm", tmp_path)
    if damage.endswith("mismatch"):  # the file meta (the request) announces another class or instance
        dataset = dcmread(path)
        if damage == "class-mismatch":
            dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        else:
            dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(path)  # enforce_file_format=True would copy the data set's UIDs into the meta
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-3000])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    return path


def test_watermark_refuses_before_writing(storage, tmp_path, settings):
    settings.MIN_FREE_BYTES = 1 << 62
    result = save(make_instance("CT_small.dcm", tmp_path))
    assert result.status == Status.OUT_OF_RESOURCES
    assert not Instance.objects.exists() and stored_files(storage) == [] and temp_files(storage) == []


def test_concurrent_saves_of_one_instance_store_it_once(storage, tmp_path):
    """Associations racing with the same new instance and study: one row each, one file, all answered success."""
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    path = make_instance("CT_small.dcm", tmp_path, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
    others = [
        make_instance("CT_small.dcm", tmp_path / str(n), study_uid=study_uid, series_uid=series_uid) for n in range(4)
    ]
    results: list[store.StoreResult] = []
    barrier = threading.Barrier(8)

    def send(source: Path) -> None:
        try:
            barrier.wait(timeout=10)
            results.append(save(source))
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(source,)) for source in [path] * 4 + others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result.ok for result in results) and len(results) == 8, [r.reason for r in results]
    assert sorted(result.outcome for result in results if result.sop_instance_uid == sop_uid) == [
        "duplicate",
        "duplicate",
        "duplicate",
        "stored",
    ]
    assert Instance.objects.count() == 5 and Series.objects.count() == 1 and Study.objects.count() == 1
    assert Patient.objects.count() == 1 and len(stored_files(storage)) == 5
    assert_stored_as_sent(path)


def test_instance_path_never_leaves_the_root(storage, tmp_path):
    save(make_instance("CT_small.dcm", tmp_path))
    instance = Instance.objects.get()
    instance.path = "../../etc/passwd"
    with pytest.raises(ValueError, match="outside the storage root"):
        store.instance_path(instance)


def test_sweep_removes_temp_files_of_dead_processes_only(storage):
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_TEMP_DIR, str(storage)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        live_folder = Path(child.stdout.readline().strip())
        assert (live_folder / "receiving.dcm").is_file()
        mine = store.temp_dir() / "in-flight.dcm"
        mine.write_bytes(b"ours, being written")
        dead = storage / ".tmp" / "otherhost-123-abc"
        dead.mkdir()
        (dead / ".lock").touch()
        (dead / "half.dcm").write_bytes(b"left by a crash")
        assert store.sweep_temp_files() == 1
        assert not dead.exists() and mine.exists() and (live_folder / "receiving.dcm").exists()
    finally:
        child.kill()
        child.wait()
    assert store.sweep_temp_files() == 1  # its lock went with it
    assert not live_folder.exists() and mine.exists()


# A process that owns a temp folder (and a half-written file in it) until killed.
_HOLD_TEMP_DIR = """
import sys, time
from pathlib import Path
from gateway import tempdirs
folder = tempdirs.process_dir(Path(sys.argv[1]))
(folder / "receiving.dcm").write_bytes(b"half")
print(folder, flush=True)
time.sleep(60)
"""


def test_fsync_pool_works_in_a_forked_child(storage):
    """A process forked after the pool started (a listener, a worker) gets threads of its own."""
    probe = store.temp_dir() / "probe"
    probe.write_bytes(b"x")
    assert store.sync_soon(probe).result(timeout=10) is None
    pid = os.fork()
    if pid == 0:  # the child: a stale pool would never run the fsync, and result() would time out
        code = 1
        try:
            code = 0 if store.sync_soon(probe).result(timeout=10) is None else 2
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
