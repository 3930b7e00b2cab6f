"""Downtime entry: an administrator types an order in the admin while the RIS is down."""

from __future__ import annotations

from django.urls import reverse
from pydicom.uid import UID

from worklist.models import Hl7Message, Order, Patient, PerformedStep, ScheduledStep

INLINE = "steps"  # the inline formset prefix (ScheduledStep.order related_name)


def order_form(patient: Patient, accession: str, **step) -> dict:
    data = {
        "patient": patient.pk,
        "accession_number": accession,
        "requested_procedure_description": "CT CHEST",
        "requested_procedure_priority": "ROUTINE",
        "requested_procedure_code": "{}",
        f"{INLINE}-TOTAL_FORMS": "1",
        f"{INLINE}-INITIAL_FORMS": "0",
        f"{INLINE}-MIN_NUM_FORMS": "1",
        f"{INLINE}-MAX_NUM_FORMS": "1000",
        f"{INLINE}-0-step_id": "",
        f"{INLINE}-0-modality": "CT",
        f"{INLINE}-0-station_ae_title": "CT1",
        f"{INLINE}-0-start_date": "20240301",
        f"{INLINE}-0-start_time": "0900",
        f"{INLINE}-0-description": "CT chest",
        f"{INLINE}-0-status": "SCHEDULED",
        f"{INLINE}-0-protocol_codes": "[]",
    }
    data.update({f"{INLINE}-0-{key}": value for key, value in step.items()})
    return data


def test_add_form_with_an_inline_step_creates_order_step_and_study_uid(admin_client):
    patient = Patient.objects.create(patient_id="DT001", patient_name="DOWNTIME^DORA")
    assert admin_client.get(reverse("admin:worklist_order_add")).status_code == 200
    response = admin_client.post(reverse("admin:worklist_order_add"), order_form(patient, "DT-1"))
    assert response.status_code == 302, response.content.decode()[-3000:]
    order = Order.objects.get(accession_number="DT-1")
    assert order.source == "admin" and order.status == "SCHEDULED"
    assert UID(order.study_instance_uid).is_valid
    assert order.requested_procedure_id == "DT-1"
    step = ScheduledStep.objects.get(order=order)
    assert (step.step_id, step.station_ae_title, step.modality, step.start_date) == ("1", "CT1", "CT", "20240301")


def test_add_form_refuses_an_accession_number_in_use(admin_client):
    patient = Patient.objects.create(patient_id="DT002")
    admin_client.post(reverse("admin:worklist_order_add"), order_form(patient, "DT-2"))
    response = admin_client.post(reverse("admin:worklist_order_add"), order_form(patient, "DT-2"))
    assert response.status_code == 200 and "Another order has this accession number" in response.content.decode()
    assert Order.objects.filter(accession_number="DT-2").count() == 1


def test_change_form_edits_the_step_and_keeps_the_study_uid(admin_client):
    patient = Patient.objects.create(patient_id="DT003")
    admin_client.post(reverse("admin:worklist_order_add"), order_form(patient, "DT-3"))
    order = Order.objects.get(accession_number="DT-3")
    step = order.steps.get()
    data = order_form(patient, "DT-3", id=str(step.pk), order=str(order.pk), step_id="1", modality="MR")
    data[f"{INLINE}-INITIAL_FORMS"] = "1"
    response = admin_client.post(reverse("admin:worklist_order_change", args=[order.pk]), data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert ScheduledStep.objects.get(pk=step.pk).modality == "MR"
    assert Order.objects.get(pk=order.pk).study_instance_uid == order.study_instance_uid


def test_cancel_action_closes_orders_and_their_steps(admin_client):
    patient = Patient.objects.create(patient_id="DT004")
    for accession in ("DT-4", "DT-5"):
        admin_client.post(reverse("admin:worklist_order_add"), order_form(patient, accession))
    orders = Order.objects.filter(accession_number__in=["DT-4", "DT-5"])
    response = admin_client.post(
        reverse("admin:worklist_order_changelist"),
        {"action": "cancel_orders", "_selected_action": [str(order.pk) for order in orders]},
        follow=True,
    )
    assert "2 order(s) cancelled" in response.content.decode()
    assert set(orders.values_list("status", flat=True)) == {"CANCELED"}
    assert set(ScheduledStep.objects.filter(order__in=orders).values_list("status", flat=True)) == {"CANCELED"}


def test_hl7_and_performed_step_pages_are_read_only(admin_client):
    row = Hl7Message.objects.create(control_id="X1", message_type="ADT^A08", received_at="2024-01-01T00:00:00Z",
                                    ack_code="AA", ack="MSH|^~\\&|ISTHMUS\rMSA|AA|X1\r", raw="MSH|...")  # fmt: skip
    page = admin_client.get(reverse("admin:worklist_hl7message_change", args=[row.pk]))
    assert page.status_code == 200 and "MSA|AA|X1" in page.content.decode()
    assert admin_client.get(reverse("admin:worklist_hl7message_add")).status_code == 403
    PerformedStep.objects.create(sop_instance_uid="1.2.3.4", attributes={})
    assert admin_client.get(reverse("admin:worklist_performedstep_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:worklist_performedstep_add")).status_code == 403
    assert admin_client.get(reverse("admin:worklist_patient_add")).status_code == 200
