"""Orthanc's DICOMweb plugin as a client of Isthmus: it searches with QIDO-RS and pulls a study with WADO-RS."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dicomweb.archive import reader_token, short_db_connections, store_study  # noqa: F401
from tests.gateway.instances import dataset_bytes
from tests.orthanc import Orthanc

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("short_db_connections")]


class OrthancWithIsthmus(Orthanc):
    """An Orthanc whose DICOMweb plugin knows Isthmus as the remote server `isthmus`."""

    def __init__(self, workdir: Path, dicomweb_url: str, token: str) -> None:
        self.server = {"Url": dicomweb_url, "HttpHeaders": {"Authorization": f"Bearer {token}"}}
        super().__init__(workdir, ae_title="ORTHANCWEB")

    def _config(self, modalities: dict) -> dict:
        config = super()._config(modalities)
        config["DicomWeb"]["Servers"] = {"isthmus": self.server}
        return config


@pytest.fixture
def orthanc(live_server, tmp_path):
    peer = OrthancWithIsthmus(tmp_path / "orthanc", f"{live_server.url}/dicomweb/", reader_token())
    peer.start()
    yield peer
    peer.close()


def test_orthanc_searches_and_retrieves_from_isthmus(orthanc, tmp_path):
    study = store_study(tmp_path / "sent", "CT_small.dcm", series=2, per_series=2, StudyDate="20260110")
    other = store_study(tmp_path / "other", "MR_small.dcm", StudyDate="20200101")
    found = orthanc.session.post(
        f"{orthanc.url}/dicom-web/servers/isthmus/qido",
        json={"Uri": "/studies", "Arguments": {"StudyDate": "20260101-20261231"}},
        timeout=30,
    )
    assert found.status_code == 200
    # Orthanc parses our DICOM JSON and answers in its own shape: {"Name": ..., "Value": "single value"}.
    assert [item["0020000D"]["Value"] for item in found.json()] == [study.uid]
    # (Orthanc 1.10 drops IS values sent as JSON numbers, as PS3.18 F.2.3 has them: counts are checked elsewhere.)
    assert found.json()[0]["00080061"]["Value"] == "CT"  # ModalitiesInStudy
    assert other.uid not in found.text
    series = orthanc.session.post(
        f"{orthanc.url}/dicom-web/servers/isthmus/qido", json={"Uri": f"/studies/{study.uid}/series"}, timeout=30
    ).json()
    assert {item["0020000E"]["Value"] for item in series} == set(study.series)
    pulled = orthanc.session.post(
        f"{orthanc.url}/dicom-web/servers/isthmus/retrieve",
        json={"Resources": [{"Study": study.uid}]},
        timeout=60,
    )
    assert pulled.status_code == 200, pulled.text
    assert sorted(orthanc.wait_for_instances(4)) == sorted(study.files)
    for sop, sent in study.files.items():
        assert orthanc.instance_file(sop).endswith(dataset_bytes(sent))
