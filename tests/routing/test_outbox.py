"""The outbox: a stored instance's forward jobs are written in its index transaction, and cost nothing without rules."""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway.indexing import HEADER_TAGS
from gateway.models import Instance
from routing import outbox
from routing.models import Destination, ForwardJob
from tests.gateway.instances import make_instance, sop_uid_of, storescu
from tests.routing.conftest import rule


def cloud(name: str) -> Destination:
    return Destination.objects.create(name=name, kind=Destination.Kind.DICOMWEB, url=f"http://127.0.0.1:9/{name}")


def test_acknowledged_instances_already_have_their_jobs(storage, modality, listener, rings, tmp_path):
    ct_pacs, mr_pacs, archive = cloud("ct-pacs"), cloud("mr-pacs"), cloud("archive")
    rule("ct", {"Modality": "CT"}, ct_pacs, order=10)
    rule("mr", {"Modality": "MR"}, mr_pacs, order=20)
    rule("all", {}, archive, order=30)
    study = "1.2.826.0.1.3680043.8.498.1"
    ct = make_instance("CT_small.dcm", tmp_path / "in", study_uid=study)
    mr = make_instance("MR_small.dcm", tmp_path / "in", study_uid=study)

    assert storescu(listener.port, [ct, mr]).returncode == 0

    owed = {
        (job.instance.sop_instance_uid, job.destination.name, job.rule.name, job.state)
        for job in ForwardJob.objects.select_related("instance", "destination", "rule")
    }
    assert owed == {
        (sop_uid_of(ct), "ct-pacs", "ct", "pending"),
        (sop_uid_of(ct), "archive", "all", "pending"),
        (sop_uid_of(mr), "mr-pacs", "mr", "pending"),
        (sop_uid_of(mr), "archive", "all", "pending"),
    }
    job = ForwardJob.objects.filter(instance__sop_instance_uid=sop_uid_of(ct)).first()
    assert job.study_instance_uid == study and job.size == Instance.objects.get(pk=job.instance_id).size
    # One doorbell per (destination, study) commit, rung after the commit.
    assert set(rings.rung()) == {(ct_pacs.pk, study), (mr_pacs.pk, study), (archive.pk, study)}


def test_conditions_on_attributes_the_index_does_not_read(storage, modality, listener, rings, tmp_path):
    wanted = cloud("north")
    rule("north", {"InstitutionName": "re:(?i)north", "CallingAE": "CT?"}, wanted)
    assert 0x00080080 not in HEADER_TAGS
    north = make_instance("CT_small.dcm", tmp_path / "in", InstitutionName="North Hospital")
    south = make_instance("CT_small.dcm", tmp_path / "in", InstitutionName="South Hospital")

    assert storescu(listener.port, [north, south]).returncode == 0

    assert list(ForwardJob.objects.values_list("instance__sop_instance_uid", flat=True)) == [sop_uid_of(north)]
    assert 0x00080080 in outbox.tags()  # read from each header only because a rule names it


def test_disabled_rules_and_destinations_owe_nothing(storage, modality, listener, rings, tmp_path):
    off = cloud("off")
    off.enabled = False
    off.save()
    rule("to-disabled", {}, off)
    rule("disabled", {}, cloud("on"), enabled=False)

    assert storescu(listener.port, [make_instance("CT_small.dcm", tmp_path / "in")]).returncode == 0

    assert Instance.objects.count() == 1
    assert ForwardJob.objects.count() == 0


def test_without_rules_write_jobs_runs_no_query(storage, modality, listener, rings, tmp_path):
    assert storescu(listener.port, [make_instance("CT_small.dcm", tmp_path / "in")]).returncode == 0
    instance = Instance.objects.get()
    outbox.current()  # the periodic version check, as any first instance of a second pays it

    with CaptureQueriesContext(connection) as queries:
        assert outbox.tags() == ()
        assert outbox.write_jobs(instance, received=None) == 0
    assert len(queries) == 0


def test_rule_changes_reach_the_cache(transactional_db, rings, settings):
    settings.ROUTING_RULES_RELOAD_SECONDS = 0.0  # another process's change is seen at the next check
    destination = cloud("later")
    assert outbox.current().rules == ()
    created = rule("later", {"Modality": "CT"}, destination)
    assert [r.name for r in outbox.current().rules] == ["later"]
    created.destinations.clear()
    assert outbox.current().rules[0].destination_ids == ()
