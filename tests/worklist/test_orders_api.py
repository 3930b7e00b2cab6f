"""Orders through the REST API: create, change, cancel, as a RIS script would (staff session or worklist token)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from pydicom.uid import UID
from rest_framework.test import APIClient

from worklist.models import Order, Patient, ScheduledStep

URL = "/api/worklist/orders/"


@pytest.fixture
def staff(db) -> APIClient:
    client = APIClient()
    client.force_authenticate(User.objects.create_user("ris", password="x", is_staff=True))
    return client


def new_order(accession: str = "API-1") -> dict:
    return {
        "patient": {"patient_id": "APIPAT1", "issuer_of_patient_id": "HOSP", "patient_name": "SCRIPT^SAM",
                    "patient_birth_date": "19800101", "patient_sex": "M"},
        "accession_number": accession,
        "requested_procedure_description": "US ABDOMEN",
        "steps": [{"step_id": "S1", "modality": "US", "station_ae_title": "US1", "start_date": "20240401",
                   "start_time": "1000"}],
    }  # fmt: skip


def test_create_change_cancel(staff):
    created = staff.post(URL, new_order(), format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert UID(body["study_instance_uid"]).is_valid and body["source"] == "api" and body["status"] == "SCHEDULED"
    assert body["steps"][0]["status"] == "SCHEDULED"
    order = Order.objects.get(accession_number="API-1")
    assert order.patient.patient_name == "SCRIPT^SAM"

    changed = staff.patch(f"{URL}{order.pk}/", {"steps": [{"step_id": "S1", "start_time": "1130"}],
                                               "requested_procedure_priority": "HIGH"}, format="json")  # fmt: skip
    assert changed.status_code == 200, changed.content
    assert ScheduledStep.objects.get(order=order).start_time == "1130"
    assert Order.objects.get(pk=order.pk).requested_procedure_priority == "HIGH"

    cancelled = staff.post(f"{URL}{order.pk}/cancel/", format="json")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELED"
    assert ScheduledStep.objects.get(order=order).status == "CANCELED"
    assert staff.patch(f"{URL}{order.pk}/", {"requested_procedure_priority": "LOW"}, format="json").status_code == 400
    assert staff.delete(f"{URL}{order.pk}/").status_code == 405


def test_duplicate_accession_is_a_conflict_and_list_filters(staff):
    assert staff.post(URL, new_order("API-2"), format="json").status_code == 201
    assert staff.post(URL, new_order("API-2"), format="json").status_code == 409
    assert staff.post(URL, new_order("API-3"), format="json").status_code == 201
    assert Patient.objects.filter(patient_id="APIPAT1").count() == 1
    listed = staff.get(URL, {"accession_number": "API-3"}).json()
    results = listed["results"] if isinstance(listed, dict) else listed
    assert [order["accession_number"] for order in results] == ["API-3"]


def test_missing_accession_is_a_bad_request(staff):
    body = new_order("")
    assert staff.post(URL, body, format="json").status_code == 400
    assert not Order.objects.exists()


def test_anonymous_and_non_staff_are_refused(db):
    anonymous = APIClient()
    assert anonymous.get(URL).status_code in (401, 403)
    assert anonymous.post(URL, new_order(), format="json").status_code in (401, 403)
    user = APIClient()
    user.force_authenticate(User.objects.create_user("nurse", password="x"))
    assert user.post(URL, new_order(), format="json").status_code == 403
    assert not Order.objects.exists()


def test_a_ris_script_with_a_worklist_token_manages_orders_and_nothing_else(db):
    from dicomweb.models import ApiToken

    _ris, ris_raw = ApiToken.issue("ris", read=False, worklist=True)
    _viewer, viewer_raw = ApiToken.issue("viewer", read=True)
    ris, viewer = (
        APIClient(HTTP_AUTHORIZATION=f"Bearer {ris_raw}"),
        APIClient(HTTP_AUTHORIZATION=f"Bearer {viewer_raw}"),
    )

    created = ris.post(URL, new_order("RIS-1"), format="json")
    order_url = f"{URL}{created.json()['id']}/"
    changed = ris.patch(order_url, {"requested_procedure_priority": "HIGH"}, format="json")
    refused = viewer.post(f"{order_url}cancel/", format="json")
    cancelled = ris.post(f"{order_url}cancel/", format="json")

    assert (created.status_code, changed.status_code, cancelled.status_code) == (201, 200, 200)
    assert refused.status_code == 403 and viewer.get(URL).status_code == 200  # read scope lists, never changes
    assert Order.objects.get(accession_number="RIS-1").status == "CANCELED"
    assert ris.get("/api/nodes/").status_code == 403  # no configuration
