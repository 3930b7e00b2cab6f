"""STOW-RS over real sockets: dicomweb-client and hand-made bodies against the live server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from gateway import store
from gateway.models import Instance
from tests.conftest import free_port, spawn_python, stop_process, wait_for_port
from tests.dicomweb.access import MULTIPART, bearer, encode, leftover_temp_files, multipart, stored_files
from tests.gateway.instances import make_instance, multiframe_mr


@pytest.fixture
def storage(settings, tmp_path, transactional_db) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


def instance(tmp_path: Path, template: str = "CT_small.dcm", **uids) -> Dataset:
    return dcmread(make_instance(template, tmp_path / "sent", **uids))


@pytest.fixture
def dicomweb():
    """dicomweb-client clients whose keep-alive connections are closed after the test.

    An open connection keeps a live-server thread, and its database session, alive past the test.
    """
    sessions: list[requests.Session] = []

    def client(url: str, headers: dict[str, str]) -> DICOMwebClient:
        sessions.append(requests.Session())
        return DICOMwebClient(url=url, headers=headers, session=sessions[-1])

    yield client
    for session in sessions:
        session.close()


def post(
    live_server, body: bytes, content_type: str = MULTIPART, path: str = "studies", **headers
) -> requests.Response:
    return requests.post(
        f"{live_server.url}/dicomweb/{path}",
        data=body,
        headers={"Content-Type": content_type, **headers},
        timeout=30,
    )


def failure_reasons(response: requests.Response) -> list[int]:
    answer = Dataset.from_json(response.json())
    return [item.FailureReason for item in answer.get("FailedSOPSequence", [])]


def assert_nothing_stored(storage: Path) -> None:
    assert Instance.objects.count() == 0
    assert stored_files(storage) == []
    assert leftover_temp_files() == []


def test_dicomweb_client_round_trip_stores_byte_identical_data_sets(live_server, storage, tmp_path, dicomweb):
    study = generate_uid()
    sent = [instance(tmp_path, "CT_small.dcm", study_uid=study), instance(tmp_path, "MR_small.dcm", study_uid=study)]
    client = dicomweb(f"{live_server.url}/dicomweb", bearer(name="uploader-with-a-long-name"))

    answer = client.store_instances(sent)

    assert "FailedSOPSequence" not in answer
    # dicomweb-client sends `Host: localhost` without the port, so compare the paths of the URLs.
    assert urlsplit(answer.RetrieveURL).path == f"/dicomweb/studies/{study}"
    referenced = {item.ReferencedSOPInstanceUID: item for item in answer.ReferencedSOPSequence}
    assert set(referenced) == {dataset.SOPInstanceUID for dataset in sent}
    for dataset in sent:
        item = referenced[dataset.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == dataset.SOPClassUID
        assert urlsplit(item.RetrieveURL).path == (
            f"/dicomweb/studies/{study}/series/{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}"
        )
        row = Instance.objects.get(sop_instance_uid=dataset.SOPInstanceUID)
        assert (row.source, row.calling_ae) == ("stow", "uploader-with-a-")
        path = store.instance_path(row)
        assert (row.sha256, row.size) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
        sent_bytes = encode(dataset)
        assert (
            path.read_bytes()[split_dataset(path)[1] :] == sent_bytes[split_dataset(_spill(tmp_path, sent_bytes))[1] :]
        )
    assert leftover_temp_files() == []


def _spill(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"encoded-{len(data)}.dcm"
    path.write_bytes(data)
    return path


def test_single_part_and_bare_application_dicom_are_accepted(live_server, storage, tmp_path):
    headers = bearer()
    one, two = encode(instance(tmp_path)), encode(instance(tmp_path, "MR_small.dcm"))

    assert post(live_server, multipart(one), **headers).status_code == 200
    assert post(live_server, two, "application/dicom", **headers).status_code == 200
    assert Instance.objects.count() == 2


def test_study_in_url_refuses_instances_of_other_studies_before_storing(live_server, storage, tmp_path, dicomweb):
    study = generate_uid()
    ours, other = instance(tmp_path, study_uid=study), instance(tmp_path, "MR_small.dcm")
    client = dicomweb(f"{live_server.url}/dicomweb", bearer())

    answer = client.store_instances([ours, other], study_instance_uid=study)  # 202: raise_for_status passes

    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [ours.SOPInstanceUID]
    failed = answer.FailedSOPSequence
    assert [(item.ReferencedSOPInstanceUID, item.FailureReason) for item in failed] == [(other.SOPInstanceUID, 0xA900)]
    assert not Instance.objects.filter(sop_instance_uid=other.SOPInstanceUID).exists()
    assert [path.stem for path in stored_files(storage)] == [ours.SOPInstanceUID]


def test_a_refusal_inside_the_request_transaction_fails_only_that_instance(live_server, storage, tmp_path, settings):
    """One index transaction per request, a savepoint per instance: a rejected duplicate leaves the others stored."""
    settings.DUPLICATE_POLICY = "reject"
    headers = bearer()
    study, series = generate_uid(), generate_uid()
    first = instance(tmp_path / "a", study_uid=study, series_uid=series)
    assert post(live_server, multipart(encode(first)), **headers).status_code == 200
    kept = store.instance_path(Instance.objects.get()).read_bytes()
    changed = instance(tmp_path / "b", study_uid=study, series_uid=series, sop_uid=first.SOPInstanceUID)
    changed.StudyDescription = "CHANGED"
    before, after = (instance(tmp_path / n, study_uid=study, series_uid=series) for n in ("c", "d"))

    response = post(live_server, multipart(encode(before), encode(changed), encode(after)), **headers)

    assert response.status_code == 202
    assert failure_reasons(response) == [0x0111]
    stored = set(Instance.objects.values_list("sop_instance_uid", flat=True))
    assert stored == {first.SOPInstanceUID, before.SOPInstanceUID, after.SOPInstanceUID}
    assert store.instance_path(Instance.objects.get(sop_instance_uid=first.SOPInstanceUID)).read_bytes() == kept
    assert len(stored_files(storage)) == 3 and leftover_temp_files() == []


def test_all_instances_of_another_study_is_a_conflict(live_server, storage, tmp_path):
    response = post(live_server, multipart(encode(instance(tmp_path))), path=f"studies/{generate_uid()}", **bearer())

    assert response.status_code == 409
    assert response.headers["Content-Type"] == "application/dicom+json"
    assert failure_reasons(response) == [0xA900]
    assert "Warning" in response.headers
    assert_nothing_stored(storage)


def test_non_dicom_parts_fail_each_with_its_reason(live_server, storage, tmp_path):
    good = instance(tmp_path)
    body = multipart(b"this is not DICOM", ("text/plain", b"hello"), encode(good))

    response = post(live_server, body, **bearer())

    assert response.status_code == 202
    assert failure_reasons(response) == [0xC000, 0xC000]
    assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [good.SOPInstanceUID]
    assert leftover_temp_files() == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", 'multipart/related; type="application/dicom+json"; boundary=x', "text/plain"],
)
def test_wrong_media_type_is_415(live_server, storage, tmp_path, content_type):
    response = post(live_server, multipart(encode(instance(tmp_path))), content_type, **bearer())

    assert response.status_code == 415
    assert response.headers["Content-Type"] == "application/problem+json"
    assert_nothing_stored(storage)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda data: multipart(data, close=False), id="no-closing-boundary"),
        pytest.param(lambda data: multipart(data)[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"garbage before any boundary", id="no-boundary"),
        pytest.param(lambda data: multipart(data, boundary="other"), id="other-boundary"),
    ],
)
def test_malformed_body_is_400_and_stores_nothing(live_server, storage, tmp_path, body):
    response = post(live_server, body(encode(instance(tmp_path))), **bearer())

    assert response.status_code == 400
    assert_nothing_stored(storage)


def test_oversized_body_is_413_before_anything_is_stored(live_server, storage, tmp_path, settings):
    data = encode(instance(tmp_path))
    settings.STOW_MAX_BYTES = len(data)  # the multipart framing makes the body larger

    response = post(live_server, multipart(data), **bearer())

    assert response.status_code == 413
    assert_nothing_stored(storage)


def test_too_many_parts_is_413_and_stores_nothing(live_server, storage, tmp_path, settings):
    settings.STOW_MAX_PARTS = 2
    body = multipart(*(encode(instance(tmp_path)) for _ in range(3)))

    response = post(live_server, body, **bearer())

    assert response.status_code == 413
    assert_nothing_stored(storage)


def test_stow_needs_a_token_with_write_scope(live_server, storage, tmp_path):
    body = multipart(encode(instance(tmp_path)))

    anonymous = post(live_server, body)
    read_only = post(live_server, body, **bearer(write=False))

    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert read_only.status_code == 403
    assert_nothing_stored(storage)


@pytest.fixture
def gunicorn(storage) -> Iterator[str]:
    """The production web server, which decodes chunked request bodies (the live server does not)."""
    port = free_port()
    process = spawn_python(
        "-m", "gunicorn", "gateway.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        ISTHMUS_STORAGE_DIR=str(storage),
    )  # fmt: skip
    try:
        wait_for_port(port, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def test_chunked_upload_through_gunicorn_is_streamed_and_stored(gunicorn, storage, tmp_path, dicomweb):
    # 3.2 MB: above dicomweb-client's 1 MB chunk (sent chunked) and Django's 2.5 MB DATA_UPLOAD_MAX_MEMORY_SIZE
    big = dcmread(multiframe_mr(tmp_path / "sent", frames=400))
    client = dicomweb(f"{gunicorn}/dicomweb", bearer())

    answer = client.store_instances([big])

    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [big.SOPInstanceUID]
    row = Instance.objects.get(sop_instance_uid=big.SOPInstanceUID)
    assert row.number_of_frames == 400 and row.size > 3_000_000
