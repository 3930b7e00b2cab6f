"""C-STORE SCP over real sockets: dcmtk storescu and pynetdicom as modalities, our listener, the real database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.db import connection
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from gateway.dimse.status import Status
from gateway.models import AuditEvent, Instance, Node, Series, Study
from tests.gateway.instances import (
    PATIENT_ID,
    PATIENT_NAME,
    assert_stored_as_sent,
    make_instance,
    multiframe_mr,
    pynetdicom_store,
    stored_files,
    storescu,
    temp_files,
)


@pytest.fixture
def storage(settings, tmp_path) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


@pytest.fixture
def scp(storage, modality, listener):
    return listener


def assert_nothing_stored(storage: Path) -> None:
    assert Instance.objects.count() == 0 and Study.objects.count() == 0
    assert stored_files(storage) == []
    assert temp_files(storage) == []


def test_storescu_ct_series_is_stored_and_indexed(scp, storage, tmp_path):
    study_uid, series_uid = generate_uid(), generate_uid()
    files = [
        make_instance("CT_small.dcm", tmp_path / "ct", study_uid=study_uid, series_uid=series_uid, InstanceNumber=n)
        for n in range(1, 6)
    ]
    result = storescu(scp.port, files)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 5
    for path in files:
        assert_stored_as_sent(path)
    study = Study.objects.get(study_instance_uid=study_uid)
    assert study.patient.patient_id == PATIENT_ID and study.patient.patient_name == PATIENT_NAME
    assert study.calling_ae == "CT1"
    series = Series.objects.get(series_instance_uid=series_uid)
    assert series.modality == "CT" and series.study == study
    assert sorted(series.instances.values_list("instance_number", flat=True)) == [1, 2, 3, 4, 5]
    assert temp_files(storage) == []


def test_storescu_mr_multiframe(scp, tmp_path):
    path = multiframe_mr(tmp_path / "mr", frames=4)
    result = storescu(scp.port, [path])
    assert result.returncode == 0, result.stderr
    instance = assert_stored_as_sent(path)
    assert instance.number_of_frames == 4 and instance.rows == 64 and instance.columns == 64
    assert instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"
    assert instance.series.modality == "MR"


# dcmtk storescu sends these unchanged when told to propose the file's own syntax.
STORESCU_FILES = [
    ("MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"),
    ("CT_small.dcm", "-xe", "1.2.840.10008.1.2.1"),
    ("MR_small_bigendian.dcm", "-xb", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "-xd", "1.2.840.10008.1.2.1.99"),
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    ("JPEG-lossy.dcm", "-xx", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "-xs", "1.2.840.10008.1.2.4.70"),
]


@pytest.mark.parametrize(("template", "option", "transfer_syntax"), STORESCU_FILES)
def test_storescu_transfer_syntax_kept_as_received(scp, tmp_path, template, option, transfer_syntax):
    path = make_instance(template, tmp_path)
    result = storescu(scp.port, [path], option)
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr
    assert assert_stored_as_sent(path).transfer_syntax_uid == transfer_syntax


# TESTDATA.md: Debian's storescu cannot send these unchanged; pynetdicom proposes the file's own syntax.
PYNETDICOM_FILES = [
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81"),
]


@pytest.mark.parametrize(("template", "transfer_syntax"), PYNETDICOM_FILES)
def test_compressed_transfer_syntax_kept_as_received(scp, tmp_path, template, transfer_syntax):
    path = make_instance(template, tmp_path)
    assert pynetdicom_store(scp.port, path) == Status.SUCCESS
    assert assert_stored_as_sent(path).transfer_syntax_uid == transfer_syntax


def test_same_instance_twice_is_acknowledged_once(scp, storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    assert storescu(scp.port, [path, path]).stderr.count("Received Store Response (Success)") == 2
    assert_stored_as_sent(path)
    assert Instance.objects.count() == 1 and len(stored_files(storage)) == 1
    assert not AuditEvent.objects.exists()


def test_different_bytes_same_uid_kept_first_and_audited(scp, storage, tmp_path):
    sop_uid = generate_uid()
    first = make_instance("CT_small.dcm", tmp_path / "a", sop_uid=sop_uid)
    second = make_instance("CT_small.dcm", tmp_path / "b", sop_uid=sop_uid, SeriesDescription="edited")
    assert pynetdicom_store(scp.port, first) == Status.SUCCESS
    assert pynetdicom_store(scp.port, second) == Status.SUCCESS  # keep-first answers success
    assert_stored_as_sent(first)
    audit = AuditEvent.objects.get()
    assert audit.action == "store.duplicate.kept-first" and audit.target == sop_uid and audit.actor == "CT1"
    assert PATIENT_NAME not in audit.detail and PATIENT_ID not in audit.detail


def test_node_without_store_permission_is_refused(scp, storage, tmp_path):
    Node.objects.filter(ae_title="CT1").update(allow_store=False)
    path = make_instance("CT_small.dcm", tmp_path)
    assert pynetdicom_store(scp.port, path) == Status.REFUSED_NOT_AUTHORIZED == 0x0124
    assert_nothing_stored(storage)


def test_watermark_refuses_with_out_of_resources(scp, storage, settings, tmp_path):
    settings.MIN_FREE_BYTES = 1 << 62
    path = make_instance("CT_small.dcm", tmp_path)
    assert pynetdicom_store(scp.port, path) == Status.OUT_OF_RESOURCES == 0xA700
    assert_nothing_stored(storage)


def test_truncated_dataset_cannot_be_understood(scp, storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    path.write_bytes(path.read_bytes()[:-1000])  # cut inside the pixel data
    assert pynetdicom_store(scp.port, path) == Status.CANNOT_UNDERSTAND == 0xC000
    assert_nothing_stored(storage)


def test_uid_with_dot_dot_slash_is_refused(scp, storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path, study_uid="1.2.3/../../../../etc")
    assert pynetdicom_store(scp.port, path) == Status.CANNOT_UNDERSTAND
    assert_nothing_stored(storage)
    assert not (storage.parent / "etc").exists()


def test_dataset_of_another_sop_class_is_refused(scp, storage, tmp_path):
    path = make_instance("CT_small.dcm", tmp_path)
    dataset = dcmread(path)
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # the request says MR, the data set is CT
    dataset.save_as(path)
    assert pynetdicom_store(scp.port, path) == Status.DATASET_MISMATCH == 0xA900
    assert_nothing_stored(storage)


def test_abort_mid_transfer_leaves_nothing(scp, storage, tmp_path):
    path = multiframe_mr(tmp_path, frames=64)  # ~0.5 MB: many P-DATA fragments
    meta, offset = split_dataset(path)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ISTHMUS", max_pdu=16384)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    request.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    request._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = assoc._get_valid_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID, "scu")
    fragments = list(message.encode_msg(context.context_id, 16384))
    for fragment in fragments[: len(fragments) // 2]:  # the command and half of the data set
        assoc.dul.send_pdu(fragment)
    assert _wait_for(lambda: temp_files(storage)), "the listener never started writing the data set"
    assoc.abort()
    assert _wait_for(lambda: not temp_files(storage)), f"left behind: {temp_files(storage)}"
    assert_nothing_stored(storage)


def test_database_unreachable_answers_retryable_failure(scp, storage, tmp_path):
    """PostgreSQL only: new connections refused and the listener's own connection killed mid-association."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL to make the database unreachable for real")
    path = make_instance("CT_small.dcm", tmp_path)
    meta, _offset = split_dataset(path)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ISTHMUS")
    assert assoc.is_established
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (own_pid,) = cursor.fetchone()
    _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> {own_pid}")
    try:
        chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            response = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    finally:
        _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert response.Status == Status.INDEX_UNAVAILABLE == 0xA701
    assert_nothing_stored(storage)


def _admin(sql: str) -> None:
    """Run `sql` from the maintenance database: PostgreSQL refuses some of it on the database itself."""
    import psycopg

    db = connection.settings_dict
    with psycopg.connect(
        dbname="postgres", user=db["USER"], host=db["HOST"], port=db["PORT"] or 5432, autocommit=True
    ) as admin:
        admin.execute(sql)


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
