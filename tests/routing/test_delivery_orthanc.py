"""storescu -> Isthmus -> Orthanc, over C-STORE and over STOW-RS; what arrives is what was sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from routing import services
from routing.models import DeliveryAttempt, ForwardJob
from tests.conftest import free_port
from tests.gateway.instances import dataset_bytes, make_instance, pynetdicom_store, sop_uid_of, storescu
from tests.orthanc import Orthanc
from tests.routing.conftest import dimse_destination, drain, rule, states, stow_destination


@pytest.fixture(scope="module")
def second_orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc2"), ae_title="ORTHANC2")
    peer.start()
    yield peer
    peer.close()


def orthanc_dataset_bytes(peer: Orthanc, sop_uid: str, folder) -> bytes:
    """The data set Orthanc stored, after its own file meta."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{sop_uid}.dcm"
    copy.write_bytes(peer.instance_file(sop_uid))
    return dataset_bytes(copy)


def study_files(folder, study_uid: str, count: int = 3, template: str = "CT_small.dcm", **attributes):
    series = generate_uid()
    return [make_instance(template, folder, study_uid=study_uid, series_uid=series, **attributes) for _ in range(count)]


@pytest.mark.parametrize("kind", ["dimse", "stow"])
def test_instances_arrive_byte_identical(storage, modality, listener, rings, orthanc, tmp_path, kind):
    destination = (
        dimse_destination(orthanc) if kind == "dimse" else stow_destination(orthanc.dicomweb_url, batch_size=2)
    )
    rule("everything", {}, destination)
    study = generate_uid()
    sent = study_files(tmp_path / "ct", study) + study_files(tmp_path / "mr", study, 2, "MR_small.dcm")
    assert storescu(listener.port, sent).returncode == 0
    compressed = make_instance("SC_rgb_rle.dcm", tmp_path / "rle", study_uid=study)  # RLE goes as stored
    assert pynetdicom_store(listener.port, compressed) == 0x0000
    sent.append(compressed)

    drain()

    assert states() == {"delivered": len(sent)}
    in_orthanc = set(orthanc.instances())
    for path in sent:
        assert sop_uid_of(path) in in_orthanc
        assert orthanc_dataset_bytes(orthanc, sop_uid_of(path), tmp_path / "got") == dataset_bytes(path)
    attempts = DeliveryAttempt.objects.filter(destination=destination)
    assert attempts.count() == len(sent) and set(attempts.values_list("outcome", flat=True)) == {"delivered"}
    destination.refresh_from_db()
    assert destination.last_success_at is not None and destination.last_error == ""


def test_rules_route_by_modality_fan_out_regex_and_stop(
    storage, modality, listener, rings, orthanc, second_orthanc, tmp_path
):
    pacs = dimse_destination(orthanc, "pacs")
    cloud = stow_destination(second_orthanc.dicomweb_url, "cloud")
    rule("research-only-cloud", {"StudyDescription": "re:(?i)research"}, cloud, order=1, stop=True)
    rule("ct-to-pacs", {"Modality": "CT"}, pacs, order=10)
    rule("mr-to-cloud", {"Modality": "MR"}, cloud, order=20)
    rule("mr-also-pacs", {"Modality": "MR", "CallingAE": "CT?"}, pacs, order=30)  # fan-out: MR goes to both
    ct = study_files(tmp_path / "ct", generate_uid(), 2, StudyDescription="CHEST")
    mr = study_files(tmp_path / "mr", generate_uid(), 2, "MR_small.dcm", StudyDescription="BRAIN")
    research = study_files(tmp_path / "rs", generate_uid(), 2, StudyDescription="Research protocol 7")
    assert storescu(listener.port, ct + mr + research).returncode == 0

    drain()

    assert states() == {"delivered": 2 + 4 + 2}
    pacs_has, cloud_has = set(orthanc.instances()), set(second_orthanc.instances())
    uids = {name: {sop_uid_of(path) for path in files} for name, files in (("ct", ct), ("mr", mr), ("rs", research))}
    assert uids["ct"] <= pacs_has and not uids["ct"] & cloud_has
    assert uids["mr"] <= pacs_has and uids["mr"] <= cloud_has
    assert uids["rs"] <= cloud_has and not uids["rs"] & pacs_has  # CT, but the research rule stopped there


def test_verify_destinations_and_why_they_fail(transactional_db, orthanc):
    ok, message = services.verify_destination(dimse_destination(orthanc, "pacs"))
    assert ok and message.startswith("C-ECHO success")
    down = dimse_destination(orthanc, "down")
    down.node.port = free_port()
    down.node.save()
    ok, message = services.verify_destination(down)
    assert (ok, message) == (False, "connection refused")
    ok, message = services.verify_destination(stow_destination(orthanc.dicomweb_url, "cloud"))
    assert ok and message.startswith("QIDO-RS success")
    ok, message = services.verify_destination(stow_destination(f"http://127.0.0.1:{free_port()}/dicom-web", "gone"))
    assert not ok and "ConnectionError" in message
    ok, message = services.verify_destination(stow_destination(f"{orthanc.url}/no-such-root", "wrong-url"))
    assert (ok, message) == (False, "QIDO-RS answered HTTP 404")


def test_manual_send_of_a_stored_study(storage, modality, listener, rings, orthanc, tmp_path):
    study = generate_uid()
    files = study_files(tmp_path / "ct", study, 3)
    assert storescu(listener.port, files).returncode == 0
    destination = dimse_destination(orthanc, "manual")
    assert ForwardJob.objects.count() == 0

    assert services.send_study(study, destination) == 3
    assert services.send_study(study, destination) == 0  # already owed
    drain()

    assert states() == {"delivered": 3}
    assert {sop_uid_of(path) for path in files} <= set(orthanc.instances())
