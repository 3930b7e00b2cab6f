"""STOW-RS uploads take the same routing as C-STORE: dicomweb-client -> Isthmus -> rules -> Orthanc."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid

from routing.models import ForwardJob
from tests.dicomweb.access import bearer
from tests.gateway.instances import dataset_bytes, sop_uid_of
from tests.routing.conftest import dimse_destination, drain, rule, states
from tests.routing.test_delivery_orthanc import orthanc_dataset_bytes, study_files


def test_stow_rs_uploads_are_routed_by_the_c_store_rules(storage, live_server, rings, orthanc, tmp_path):
    pacs = dimse_destination(orthanc, "pacs")
    rule("ct-to-pacs", {"Modality": "CT", "CallingAE": "uploader"}, pacs)  # a STOW caller is named by its token
    study = generate_uid()
    ct = study_files(tmp_path / "ct", study, 3)
    mr = study_files(tmp_path / "mr", study, 2, "MR_small.dcm")
    with requests.Session() as session:
        session.headers.update(bearer(name="uploader"))
        client = DICOMwebClient(f"{live_server.url}/dicomweb", session=session)
        answer = client.store_instances([dcmread(path) for path in ct + mr])
    assert len(answer.ReferencedSOPSequence) == 5

    assert (pacs.id, study) in rings.rung(wait=5)  # the outbox rang once the request's transaction committed
    assert ForwardJob.objects.filter(destination=pacs).count() == len(ct)
    drain()

    assert states() == {"delivered": len(ct)}
    in_orthanc = set(orthanc.instances())
    assert {sop_uid_of(path) for path in ct} <= in_orthanc
    assert not {sop_uid_of(path) for path in mr} & in_orthanc
    for path in ct:
        assert orthanc_dataset_bytes(orthanc, sop_uid_of(path), tmp_path / "got") == dataset_bytes(path)
