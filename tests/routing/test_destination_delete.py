"""A destination that still owes instances cannot be deleted: not from the admin, not by import_config, not at all."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from django.db.models import ProtectedError
from django.urls import reverse

from gateway.config_file import ConfigError, export_config, import_config
from gateway.models import Instance
from routing.models import DeliveryAttempt, Destination, ForwardJob
from tests.routing.operator_data import attempt, dimse_destination, job, study_with_instances
from tests.routing.test_admin import post_action

pytestmark = pytest.mark.django_db
State = ForwardJob.State
DESTINATIONS = reverse("admin:routing_destination_changelist")


@pytest.fixture
def pacs_with_backlog():
    """pacs: 2 pending (one retrying), 1 dead, 2 delivered (one with its attempt), 1 cancelled."""
    pacs = dimse_destination("pacs")
    _study, instances = study_with_instances(1, 6)
    states = [State.PENDING, State.PENDING, State.DEAD, State.DELIVERED, State.DELIVERED, State.CANCELLED]
    jobs = [job(pacs, one, state, age=timedelta(minutes=5)) for one, state in zip(instances, states, strict=True)]
    ForwardJob.objects.filter(pk=jobs[1].pk).update(attempts=3)
    attempt(jobs[3], DeliveryAttempt.Outcome.DELIVERED, at=jobs[3].created_at)
    return pacs


def test_admin_refuses_with_the_count_and_deletes_nothing(admin_client, pacs_with_backlog):
    pacs = pacs_with_backlog
    url = reverse("admin:routing_destination_delete", args=[pacs.pk])

    page = admin_client.get(url).content.decode()
    assert "3 undelivered forward job(s) (2 pending or retrying, 1 dead)" in page
    response = admin_client.post(url, {"post": "yes"})

    assert response.status_code == 200  # the refusal page again, not a 500 and not a redirect
    assert "cannot be deleted" in response.content.decode()
    assert Destination.objects.filter(pk=pacs.pk).exists() and ForwardJob.objects.count() == 6


def test_admin_bulk_delete_refuses_the_destination_with_a_backlog(admin_client, pacs_with_backlog):
    idle = dimse_destination("idle")
    response = post_action(admin_client, DESTINATIONS, "delete_selected", [pacs_with_backlog, idle], post="yes")

    assert "cannot be deleted: 3 undelivered forward job(s)" in response.content.decode()
    assert set(Destination.objects.values_list("name", flat=True)) == {"pacs", "idle"}


def test_finished_jobs_go_with_the_destination_and_the_instances_stay(admin_client, pacs_with_backlog):
    pacs = pacs_with_backlog
    ForwardJob.objects.filter(state__in=[State.PENDING, State.DEAD]).update(state=State.CANCELLED)  # the operator
    url = reverse("admin:routing_destination_delete", args=[pacs.pk])
    assert "6 delivered or cancelled forward job(s) and their attempts" in admin_client.get(url).content.decode()

    response = admin_client.post(url, {"post": "yes"}, follow=True)

    assert "was deleted successfully" in response.content.decode()
    assert not Destination.objects.filter(name="pacs").exists()
    assert ForwardJob.objects.count() == 0 and DeliveryAttempt.objects.count() == 0
    assert Instance.objects.count() == 6


def test_the_foreign_key_protects_jobs_whatever_path_deletes(pacs_with_backlog):
    with pytest.raises(ProtectedError):
        pacs_with_backlog.delete()
    assert ForwardJob.objects.count() == 6


def test_import_config_refuses_with_the_count_and_changes_nothing(pacs_with_backlog):
    document = yaml.safe_load(export_config())
    document["destinations"] = [d for d in document["destinations"] if d["name"] != "pacs"]
    document["nodes"].append({"name": "new-node", "ae_title": "NEW", "host": "10.0.0.9", "port": 104})
    text = yaml.safe_dump(document)

    for dry_run in (True, False):
        with pytest.raises(ConfigError) as refused:
            import_config(text, dry_run=dry_run)
        assert refused.value.errors == [
            "destination 'pacs' cannot be deleted: 3 undelivered forward job(s) (2 pending or retrying, 1 dead);"
            " cancel them or let them be delivered first"
        ]
    assert Destination.objects.filter(name="pacs").exists() and ForwardJob.objects.count() == 6
    assert not Destination.objects.filter(node__name="new-node").exists()

    ForwardJob.objects.filter(state__in=[State.PENDING, State.DEAD]).update(state=State.CANCELLED)
    changes = import_config(text)
    assert "- destination pacs" in [str(change) for change in changes]
    assert not Destination.objects.filter(name="pacs").exists() and ForwardJob.objects.count() == 0
