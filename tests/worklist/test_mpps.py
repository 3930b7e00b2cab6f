"""MPPS over the wire: a pynetdicom SCU creates, completes and discontinues steps; illegal moves get their status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests.worklist import factories
from tests.worklist.test_mwl_find import findscu
from worklist.models import Order, PerformedStep, ScheduledStep

TODAY = date.today().strftime("%Y%m%d")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@contextmanager
def mpps_association(port: int, calling: str = "CT1") -> Iterator[Association]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="ISTHMUS")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def in_progress(step: ScheduledStep | None = None, **overrides) -> Dataset:
    """An N-CREATE attribute list as IHE RAD-6 has a modality send it (PS3.4 Table F.7.2-1)."""
    item = Dataset()
    item.StudyInstanceUID = step.order.study_instance_uid if step else generate_uid()
    item.AccessionNumber = step.order.accession_number if step else None
    item.ScheduledProcedureStepID = step.step_id if step else None
    item.RequestedProcedureID = step.order.requested_procedure_id if step else None
    item.ReferencedStudySequence = []
    attributes = Dataset()
    attributes.SpecificCharacterSet = "ISO_IR 100"
    attributes.ScheduledStepAttributesSequence = [item]
    attributes.PatientName = step.order.patient.patient_name if step else "UNKNOWN^PATIENT"
    attributes.PatientID = step.order.patient.patient_id if step else "UNSCHEDULED-1"
    attributes.PerformedProcedureStepID = "PPS1"
    attributes.PerformedStationAETitle = "CT1"
    attributes.PerformedProcedureStepStartDate = TODAY
    attributes.PerformedProcedureStepStartTime = "101010"
    attributes.PerformedProcedureStepStatus = "IN PROGRESS"
    attributes.PerformedProcedureStepDescription = "CT head"
    attributes.PerformedProcedureStepEndDate = None
    attributes.PerformedProcedureStepEndTime = None
    attributes.Modality = "CT"
    attributes.StudyID = None
    attributes.PerformedSeriesSequence = []
    for keyword, value in overrides.items():
        if value is ...:
            del attributes[keyword]
        else:
            setattr(attributes, keyword, value)
    return attributes


def final(status: str = "COMPLETED", *, series: int = 1, **overrides) -> Dataset:
    """An N-SET modification list that ends the step (PS3.4 F.7.2.2, IHE RAD-7)."""
    modifications = Dataset()
    modifications.PerformedProcedureStepStatus = status
    modifications.PerformedProcedureStepEndDate = TODAY
    modifications.PerformedProcedureStepEndTime = "103000"
    items = []
    for number in range(series):
        image = Dataset()
        image.ReferencedSOPClassUID = CT_IMAGE
        image.ReferencedSOPInstanceUID = generate_uid()
        item = Dataset()
        item.SeriesInstanceUID = generate_uid()
        item.ProtocolName = "HEAD ROUTINE"
        item.SeriesDescription = f"series {number + 1}"
        item.RetrieveAETitle = None
        item.PerformingPhysicianName = None
        item.OperatorsName = None
        item.ReferencedImageSequence = [image]
        items.append(item)
    modifications.PerformedSeriesSequence = items
    for keyword, value in overrides.items():
        if value is ...:
            del modifications[keyword]
        else:
            setattr(modifications, keyword, value)
    return modifications


def create(assoc: Association, attributes: Dataset, uid: str | None) -> tuple[int, Dataset]:
    status, answer = assoc.send_n_create(attributes, ModalityPerformedProcedureStep, uid)
    return int(status.Status), status


def update(assoc: Association, modifications: Dataset, uid: str) -> tuple[int, Dataset]:
    status, _ = assoc.send_n_set(modifications, ModalityPerformedProcedureStep, uid)
    return int(status.Status), status


@pytest.fixture
def scheduled(listener, modality) -> ScheduledStep:
    return factories.scheduled(
        patient_fields=dict(patient_id="PID-MPPS", patient_name="MÜLLER^ANNA"),
        order_fields=dict(accession_number="ACC-MPPS"),
        step_id="SPS-MPPS",
        start_date=TODAY,
    )


def state(step: ScheduledStep) -> tuple[str, str]:
    step.refresh_from_db()
    step.order.refresh_from_db()
    return step.status, step.order.status


def test_create_then_complete_closes_the_scheduled_step(listener, scheduled, tmp_path):
    uid = generate_uid()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled), uid)[0] == 0x0000
        performed = PerformedStep.objects.get(sop_instance_uid=uid)
        assert performed.status == "IN PROGRESS"
        assert list(performed.scheduled_steps.all()) == [scheduled]
        assert performed.matched_patient == scheduled.order.patient
        assert performed.patient_name == "MÜLLER^ANNA"  # decoded from ISO_IR 100
        assert (performed.accession_number, performed.modality, performed.start_date) == ("ACC-MPPS", "CT", TODAY)
        assert state(scheduled) == (ScheduledStep.Status.STARTED, Order.Status.IN_PROGRESS)
        # Started, not finished: the modality can still find it.
        answers, _ = findscu(listener.port, ["AccessionNumber=ACC-MPPS", "PatientID"], tmp_path / "started")
        assert [a.PatientID for a in answers] == ["PID-MPPS"]

        assert update(assoc, final("COMPLETED", series=2), uid)[0] == 0x0000

    performed.refresh_from_db()
    assert performed.status == "COMPLETED"
    assert (performed.end_date, performed.end_time) == (TODAY, "103000")
    assert len(performed.performed_series) == 2
    assert performed.performed_series[0]["0008103E"]["Value"] == ["series 1"]  # Series Description, DICOM JSON
    assert state(scheduled) == (ScheduledStep.Status.COMPLETED, Order.Status.COMPLETED)
    answers, _ = findscu(listener.port, ["AccessionNumber=ACC-MPPS", "PatientID"], tmp_path / "completed")
    assert answers == []  # the worklist no longer offers a completed step


def test_discontinue(listener, scheduled):
    uid = generate_uid()
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator, reason.CodeMeaning = "110514", "DCM", "Incorrect worklist entry"
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled), uid)[0] == 0x0000
        modifications = final(
            "DISCONTINUED", series=0, PerformedProcedureStepDiscontinuationReasonCodeSequence=[reason]
        )
        assert update(assoc, modifications, uid)[0] == 0x0000
    performed = PerformedStep.objects.get(sop_instance_uid=uid)
    assert performed.status == "DISCONTINUED"
    assert performed.discontinuation_reason["00080100"]["Value"] == ["110514"]
    assert state(scheduled) == (ScheduledStep.Status.DISCONTINUED, Order.Status.DISCONTINUED)


def test_intermediate_n_set_keeps_the_step_in_progress(listener, scheduled):
    uid = generate_uid()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled), uid)[0] == 0x0000
        progress = Dataset()
        progress.PerformedProcedureStepDescription = "CT head and neck"
        assert update(assoc, progress, uid)[0] == 0x0000
    performed = PerformedStep.objects.get(sop_instance_uid=uid)
    assert (performed.status, performed.description) == ("IN PROGRESS", "CT head and neck")
    assert state(scheduled) == (ScheduledStep.Status.STARTED, Order.Status.IN_PROGRESS)


def snapshot(uid: str) -> tuple:
    performed = PerformedStep.objects.get(sop_instance_uid=uid)
    return performed.status, performed.attributes, performed.updated_at, performed.performed_series


def test_illegal_transitions_answered_and_change_nothing(listener, scheduled):
    uid = generate_uid()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled), uid)[0] == 0x0000
        started = snapshot(uid)

        # PS3.4 F.7.2.1.2: a second N-CREATE for the same instance.
        assert create(assoc, in_progress(scheduled), uid)[0] == 0x0111
        # F.7.2.2.2: N-SET on an instance that does not exist.
        assert update(assoc, final(), generate_uid())[0] == 0x0112
        # Completing without the final state requirements (a series, the end time).
        assert update(assoc, final(series=0), uid)[0] == 0x0121
        assert update(assoc, final(PerformedProcedureStepEndTime=None), uid)[0] == 0x0121
        # A status the state machine does not know.
        assert update(assoc, final("SCHEDULED"), uid)[0] == 0x0106
        assert snapshot(uid) == started
        assert state(scheduled) == (ScheduledStep.Status.STARTED, Order.Status.IN_PROGRESS)

        assert update(assoc, final(), uid)[0] == 0x0000
        completed = snapshot(uid)
        # F.7.2.2.2: after COMPLETED the object may no longer be updated.
        code, status = update(assoc, final("DISCONTINUED", series=0), uid)
        assert code == 0x0110
        assert status.ErrorID == 0xA710
        code, _ = update(assoc, final(), uid)
        assert code == 0x0110
        assert snapshot(uid) == completed
    assert PerformedStep.objects.count() == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"PerformedStationAETitle": ...}, 0x0120),  # type 1 missing
        ({"Modality": None}, 0x0121),  # type 1 without a value
        ({"ScheduledStepAttributesSequence": []}, 0x0121),
        ({"PerformedProcedureStepStatus": "COMPLETED"}, 0x0106),  # N-CREATE only starts a step
    ],
)
def test_bad_n_create_is_refused_and_stores_nothing(listener, scheduled, override, expected):
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled, **override), generate_uid())[0] == expected
    assert PerformedStep.objects.count() == 0
    assert state(scheduled) == (ScheduledStep.Status.SCHEDULED, Order.Status.SCHEDULED)


def test_unscheduled_case_is_stored_and_visible(listener, scheduled):
    uid = generate_uid()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(None), uid)[0] == 0x0000
        assert update(assoc, final(), uid)[0] == 0x0000
    performed = PerformedStep.objects.get(sop_instance_uid=uid)
    assert performed.unscheduled
    assert (performed.status, performed.patient_id, performed.matched_patient) == ("COMPLETED", "UNSCHEDULED-1", None)
    assert state(scheduled) == (ScheduledStep.Status.SCHEDULED, Order.Status.SCHEDULED)


def test_scp_assigns_the_instance_uid_when_the_scu_does_not(listener, scheduled):
    """PS3.7 10.1.5.1.4: the N-CREATE-RSP carries the UID the SCP made up, and the row has it."""
    responses = []
    with mpps_association(listener.port) as assoc:
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: responses.append(event.message.command_set))
        status, _ = assoc.send_n_create(in_progress(scheduled), ModalityPerformedProcedureStep, None)
    assert status.Status == 0x0000
    performed = PerformedStep.objects.get()
    assert responses[-1].AffectedSOPInstanceUID == performed.sop_instance_uid


def test_node_without_mpps_permission_is_refused(listener, scheduled, modality):
    modality.allow_mpps = False
    modality.save()
    with mpps_association(listener.port) as assoc:
        assert create(assoc, in_progress(scheduled), generate_uid())[0] == 0x0124
    assert PerformedStep.objects.count() == 0
