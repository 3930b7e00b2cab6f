"""Storage Commitment SCP over real associations: a pynetdicom modality asks, Isthmus reports.

The modality is a pynetdicom SCU registered as a node; on the node's port it
also runs its own SCP, where reports sent on a new association arrive.
Reports on a new association go through a real Celery worker.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from gateway import commitment
from gateway.celery import app as celery_app
from gateway.models import CommitmentRequest, Instance, Node, Patient, Series, Study
from gateway.tasks import sweep_commitment_reports
from tests.conftest import ROOT, free_port, peer_env, stop_process

SC, SCI = StorageCommitmentPushModel, StorageCommitmentPushModelInstance
State = CommitmentRequest.State


# --- Arrange: stored instances, the modality, its report listener, a worker ---


def store_instance(series: Series, sop_class: str = CTImageStorage) -> Instance:
    """A small real file under STORAGE_DIR and its index row, as the store leaves them."""
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    sop_instance = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    relative = f"{series.study.study_instance_uid}/{series.series_instance_uid}/{sop_instance}.dcm"
    path = Path(settings.STORAGE_DIR) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return Instance.objects.create(
        sop_instance_uid=sop_instance, series=series, sop_class_uid=sop_class, transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
        path=relative, size=path.stat().st_size, sha256="0" * 64, calling_ae="CMTSCU", received_at=timezone.now(),
    )  # fmt: skip


@pytest.fixture
def series(transactional_db) -> Series:
    patient = Patient.objects.create(patient_id="CMT-1", patient_name="Commit^Test")
    study = Study.objects.create(study_instance_uid=generate_uid(), patient=patient, received_at=timezone.now())
    return Series.objects.create(
        series_instance_uid=generate_uid(), study=study, modality="CT", received_at=timezone.now()
    )


@pytest.fixture
def stored(series) -> list[Instance]:
    return [store_instance(series), store_instance(series)]


@pytest.fixture
def requester(transactional_db) -> Node:
    """The modality as a registered node: its report listener will use this port."""
    return Node.objects.create(name="cmt-modality", ae_title="CMTSCU", host="127.0.0.1", port=free_port())


@dataclass
class Report:
    event_type: int
    info: Dataset
    assoc: object
    calling_ae: str
    proposed_scp_role: bool


def collect_into(reports: queue.Queue):
    def on_report(event: evt.Event) -> int:
        role = event.assoc.requestor.role_selection.get(SC) if event.assoc.is_acceptor else None
        reports.put(
            Report(event.request.EventTypeID, event.event_information, event.assoc,
                   str(event.assoc.requestor.ae_title).strip(), bool(role and role.scp_role))
        )  # fmt: skip
        return 0x0000, None  # Success, no Event Reply

    return on_report


class ReportListener:
    """The modality's own SCP: accepts Isthmus's SCP role and collects N-EVENT-REPORTs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reports: queue.Queue[Report] = queue.Queue()
        self.ae = AE(ae_title="CMTSCU")
        self.ae.add_supported_context(SC, scu_role=True, scp_role=True)
        self.server = None

    def start(self) -> ReportListener:
        handlers = [(evt.EVT_N_EVENT_REPORT, collect_into(self.reports))]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def report_listener(requester):
    listener = ReportListener(requester.port)
    yield listener
    listener.stop()


@pytest.fixture
def worker(transactional_db, tmp_path):
    """A real Celery worker on the test's queue and database (the filesystem broker by default)."""
    log_file = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "gateway",
            "worker",
            "--pool",
            "solo",
            "--hostname",
            "cmt@%h",
            "--loglevel",
            "INFO",
        ],  # fmt: skip
        env=peer_env(),
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    yield process
    stop_process(process, timeout=20)
    log_file.close()


def action_information(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    """PS3.4 J.3.2.1.1: the N-ACTION's Action Information."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def modality(port: int, *, scp_role: bool, reports: queue.Queue | None = None, ae_title: str = "CMTSCU"):
    """An association from the modality; with `scp_role` it offers to take reports on it."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(SC)
    ext_neg = [build_role(SC, scu_role=True, scp_role=True)] if scp_role else []
    handlers = [(evt.EVT_N_EVENT_REPORT, collect_into(reports))] if reports is not None else []
    assoc = ae.associate("127.0.0.1", port, ae_title=settings.AE_TITLE, ext_neg=ext_neg, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def ask(assoc, transaction_uid: str, references: list[tuple[str, str]], action_type: int = 1, instance=SCI) -> int:
    status, _ = assoc.send_n_action(action_information(transaction_uid, references), action_type, SC, instance)
    return int(status.Status)


def mix(stored: list[Instance]) -> tuple[list[tuple[str, str]], str]:
    """Two stored instances and one this gateway never received."""
    unknown = generate_uid()
    return [(i.sop_class_uid, i.sop_instance_uid) for i in stored] + [(CTImageStorage, unknown)], unknown


def assert_report(report: Report, transaction_uid: str, stored: list[Instance], unknown: str) -> None:
    assert report.event_type == 2  # PS3.4 J.3.3.1: failures exist
    assert report.info.TransactionUID == transaction_uid
    committed = {
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in report.info.ReferencedSOPSequence
    }
    assert committed == {(i.sop_class_uid, i.sop_instance_uid) for i in stored}
    failed = [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID, i.FailureReason) for i in report.info.FailedSOPSequence
    ]
    assert failed == [(CTImageStorage, unknown, 0x0112)]


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(transaction_uid: str, state: str = State.DELIVERED):
    return lambda: CommitmentRequest.objects.filter(transaction_uid=transaction_uid, state=state).first()


# --- Act and assert over the wire ---------------------------------------------------


def test_report_on_the_same_association_when_the_requester_took_the_scp_role(listener, requester, stored):
    reports: queue.Queue[Report] = queue.Queue()
    references, unknown = mix(stored)
    transaction_uid = generate_uid()
    assoc = modality(listener.port, scp_role=True, reports=reports)
    try:
        # A valid N-ACTION response proves it came before the report (the SCU reads one message).
        assert ask(assoc, transaction_uid, references) == 0x0000
        report = reports.get(timeout=10)
        assert report.assoc is assoc  # the requester's own association, still open
    finally:
        assoc.release()
    assert_report(report, transaction_uid, stored, unknown)
    row = wait_for(settled(transaction_uid), 5, "the row to be delivered")
    assert row.attempts == 1 and row.delivered_at is not None and row.node == requester
    assert row.failed == [[CTImageStorage, unknown, 0x0112]] and len(row.success) == 2


@pytest.mark.parametrize("scp_role", [False, True], ids=["no-role", "role-but-released"])
def test_report_on_a_new_association_when_the_requester_releases(
    listener, requester, stored, report_listener, worker, scp_role
):
    listener.ae.dimse_timeout = 2.0  # a report attempt racing the release gives up sooner
    report_listener.start()
    references, unknown = mix(stored)
    transaction_uid = generate_uid()
    assoc = modality(listener.port, scp_role=scp_role)
    assert ask(assoc, transaction_uid, references) == 0x0000
    assoc.release()
    report = report_listener.reports.get(timeout=60)
    assert report.calling_ae == settings.AE_TITLE and report.assoc is not assoc
    assert report.proposed_scp_role  # PS3.4 J.3.3.1.2: the SCP opened it and proposed the SCP role
    assert_report(report, transaction_uid, stored, unknown)
    row = wait_for(settled(transaction_uid), 30, "the worker to record the delivery")
    assert row.delivered_at is not None and row.attempts >= 1


def test_report_stays_pending_until_the_requester_listens_then_retries_deliver_it(
    listener, requester, stored, report_listener, worker
):
    references, unknown = mix(stored)
    first, second = generate_uid(), generate_uid()
    assoc = modality(listener.port, scp_role=False)
    assert ask(assoc, first, references) == 0x0000
    assert ask(assoc, second, references) == 0x0000
    assoc.release()

    # The worker tried each once and failed: the rows wait for their next attempt.
    def tried_and_failed():
        rows = list(
            CommitmentRequest.objects.filter(transaction_uid__in=[first, second], attempts=1).exclude(last_error="")
        )
        return rows if len(rows) == 2 else None

    for row in wait_for(tried_and_failed, 30, "a failed first attempt"):
        assert row.state == State.PENDING
        assert "CMTSCU@127.0.0.1" in row.last_error
        delay = row.next_attempt_at - timezone.now()
        assert timedelta(seconds=2) < delay <= timedelta(seconds=commitment.RETRY_BASE_SECONDS)
    assert commitment.claim_due() == []  # nothing is due yet
    requester.refresh_from_db()
    assert "Storage commitment report" in requester.last_error

    report_listener.start()
    # The retry service, called directly.
    row = commitment.deliver(commitment_id=CommitmentRequest.objects.get(transaction_uid=first).pk)
    assert row.state == State.DELIVERED and row.attempts == 2
    assert_report(report_listener.reports.get(timeout=5), first, stored, unknown)

    # The beat path: once due, the sweeper claims the row and a worker delivers it.
    CommitmentRequest.objects.filter(transaction_uid=second).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    assert celery_app.conf.beat_schedule["sweep-commitment-reports"]["task"] == sweep_commitment_reports.name
    assert sweep_commitment_reports() == 1
    assert_report(report_listener.reports.get(timeout=30), second, stored, unknown)
    row = wait_for(settled(second), 30, "the swept report to be delivered")
    assert row.attempts == 2


def test_node_without_commitment_permission_is_refused(listener, requester, stored):
    requester.allow_commitment = False
    requester.save()
    assoc = modality(listener.port, scp_role=True)
    try:
        assert ask(assoc, generate_uid(), mix(stored)[0]) == 0x0124  # Refused: not authorized
    finally:
        assoc.release()
    assert not CommitmentRequest.objects.exists()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_malformed_requests_get_the_ps37_status_and_leave_nothing(listener, requester, stored):
    references = mix(stored)[0]
    assoc = modality(listener.port, scp_role=True)
    try:
        assert ask(assoc, generate_uid(), references, action_type=2) == 0x0123  # No such action
        assert ask(assoc, generate_uid(), references, instance=generate_uid()) == 0x0112  # No such SOP Instance
        assert ask(assoc, "", references) == 0x0115  # Invalid argument value: no Transaction UID
        assert ask(assoc, generate_uid(), []) == 0x0115  # ... an empty Referenced SOP Sequence
        assert ask(assoc, generate_uid(), [(CTImageStorage, "not a uid")]) == 0x0115
        assert ask(assoc, generate_uid(), references) == 0x0000  # the association is still usable
    finally:
        assoc.release()
    assert CommitmentRequest.objects.count() == 1


# --- The services, without a socket -----------------------------------------------------


def test_evaluation_names_the_reason_for_each_failure(stored, settings):
    missing_file = stored[1]
    (Path(settings.STORAGE_DIR) / missing_file.path).unlink()
    success, failed = commitment.evaluate(
        [
            [CTImageStorage, stored[0].sop_instance_uid],
            [MRImageStorage, stored[0].sop_instance_uid],
            [CTImageStorage, missing_file.sop_instance_uid],
            [CTImageStorage, "1.2.3.4"],
        ]
    )
    assert success == [[CTImageStorage, stored[0].sop_instance_uid]]
    assert failed == [
        [MRImageStorage, stored[0].sop_instance_uid, 0x0119],  # Class/Instance conflict
        [CTImageStorage, missing_file.sop_instance_uid, 0x0110],  # Processing failure
        [CTImageStorage, "1.2.3.4", 0x0112],  # No such object instance
    ]


def test_all_committed_is_event_type_1_without_a_failed_sequence(stored, requester):
    row = commitment.record_request(
        transaction_uid=generate_uid(), referenced=[[i.sop_class_uid, i.sop_instance_uid] for i in stored],
        node=requester, calling_ae="CMTSCU", peer_address="127.0.0.1",
    )  # fmt: skip
    event_type, info = commitment.event_report(row)
    assert event_type == 1 and "FailedSOPSequence" not in info and len(info.ReferencedSOPSequence) == 2


def test_delivered_policy_waits_for_routing_then_reports_what_every_destination_has(stored, requester, settings):
    from routing.models import Destination, ForwardJob

    settings.COMMITMENT_POLICY = "delivered"
    pacs = Destination.objects.create(name="pacs", kind="dicomweb", url="http://127.0.0.1:9/dicomweb")
    routed, unrouted = stored
    now = timezone.now()
    job = ForwardJob.objects.create(
        instance=routed, destination=pacs, study_instance_uid=routed.series.study.study_instance_uid,
        next_attempt_at=now, created_at=now,
    )  # fmt: skip
    references = [[i.sop_class_uid, i.sop_instance_uid] for i in stored]
    row = commitment.record_request(
        transaction_uid=generate_uid(), referenced=references, node=requester, calling_ae="CMTSCU",
        peer_address="127.0.0.1",
    )  # fmt: skip
    assert row.state == State.WAITING and row.success == [] and row.failed == []
    assert commitment.begin_attempt(commitment_id=row.pk) is None  # nothing is reported while it waits

    CommitmentRequest.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    assert commitment.release_waiting() == []  # the job is still pending: look again later
    row.refresh_from_db()
    assert row.state == State.WAITING and row.next_attempt_at > timezone.now()

    ForwardJob.objects.filter(pk=job.pk).update(state=ForwardJob.State.DEAD)
    CommitmentRequest.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    assert commitment.release_waiting() == [row.pk]
    row.refresh_from_db()
    assert row.state == State.PENDING and row.next_attempt_at <= timezone.now()
    assert row.success == [[unrouted.sop_class_uid, unrouted.sop_instance_uid]]  # no rule routed it: stored is enough
    assert row.failed == [[routed.sop_class_uid, routed.sop_instance_uid, 0x0110]]  # a destination never got it

    ForwardJob.objects.filter(pk=job.pk).update(state=ForwardJob.State.DELIVERED)
    assert commitment.evaluate(references) == (references, [])


def test_retries_give_up_after_the_last_attempt(requester, stored):
    row = commitment.record_request(
        transaction_uid=generate_uid(), referenced=[[CTImageStorage, "1.2.3"]], node=requester, calling_ae="CMTSCU",
        peer_address="127.0.0.1",
    )  # fmt: skip
    CommitmentRequest.objects.filter(pk=row.pk).update(attempts=commitment.MAX_ATTEMPTS - 1)
    row = commitment.deliver(commitment_id=row.pk)  # nothing listens on the node's port
    assert row.state == State.FAILED and row.attempts == commitment.MAX_ATTEMPTS and row.next_attempt_at is None
    assert commitment.deliver(commitment_id=row.pk) is None  # settled: no more attempts


def test_a_node_not_allowed_out_fails_at_once_and_retry_now_redrives_it(requester, report_listener, transactional_db):
    requester.allowed_out = False
    requester.save()
    row = commitment.record_request(
        transaction_uid=generate_uid(), referenced=[[CTImageStorage, "1.2.3"]], node=requester, calling_ae="CMTSCU",
        peer_address="127.0.0.1",
    )  # fmt: skip
    row = commitment.deliver(commitment_id=row.pk)
    assert row.state == State.FAILED and "not allowed out" in row.last_error and row.attempts == 1

    requester.allowed_out = True
    requester.save()
    report_listener.start()
    celery_app.conf.task_always_eager = True  # the doorbell runs the task here: no worker in this test
    try:
        assert commitment.retry_now(commitment_ids=[row.pk]) == 1
    finally:
        celery_app.conf.task_always_eager = False
    row.refresh_from_db()
    assert row.state == State.DELIVERED and row.attempts == 2
    assert report_listener.reports.get(timeout=5).event_type == 2


@pytest.mark.skipif(
    "not connection.features.has_select_for_update_skip_locked",
    reason="SKIP LOCKED is PostgreSQL's (CI runs it there); SQLite has one writer and no row locks",
)
def test_claim_skips_rows_another_sweeper_holds(requester, transactional_db):
    import threading

    rows = [
        commitment.record_request(transaction_uid=generate_uid(), referenced=[[CTImageStorage, "1.2.3"]], node=requester,
                                  calling_ae="CMTSCU", peer_address="127.0.0.1")
        for _ in range(2)
    ]  # fmt: skip
    CommitmentRequest.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    held, release = threading.Event(), threading.Event()

    def other_sweeper():
        from django.db import transaction

        with transaction.atomic():
            list(CommitmentRequest.objects.select_for_update().filter(pk=rows[0].pk))
            held.set()
            release.wait(10)
        connection.close()

    thread = threading.Thread(target=other_sweeper)
    thread.start()
    try:
        assert held.wait(10)
        assert commitment.claim_due() == [rows[1].pk]
    finally:
        release.set()
        thread.join()
    assert commitment.claim_due() == [rows[0].pk]  # free again, and the first claim's lease holds rows[1]
