"""The operators' view as a logged-in administrator sees it: queues, jobs, actions, rules, sending by hand."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.urls import reverse
from django.utils import timezone

from routing.models import DeliveryAttempt, Destination, ForwardJob, Rule
from tests.conftest import free_port
from tests.routing.operator_data import attempt, dimse_destination, job, stow_destination_form, study_with_instances

State, Outcome = ForwardJob.State, DeliveryAttempt.Outcome
JOBS = reverse("admin:routing_forwardjob_changelist")
DESTINATIONS = reverse("admin:routing_destination_changelist")


def row(html: str, row_id: str) -> str:
    found = re.search(rf'<tr id="{row_id}">(.*?)</tr>', html, re.S)
    assert found, f"no row {row_id}"
    return found.group(1)


def cell(html: str, css_class: str) -> str:
    found = re.search(rf'<td class="{css_class}">(.*?)</td>', html, re.S)
    assert found, f"no cell {css_class}"
    return re.sub(r"<[^>]+>", "", found.group(1)).strip()


@pytest.fixture
def queue(db):
    """pacs: 2 pending (one 30 min old), 1 dead with its error, 1 delivered in the last hour; cloud: idle."""
    pacs = dimse_destination("pacs", last_error="association rejected", last_error_at=timezone.now())
    cloud = Destination.objects.create(name="cloud", kind="dicomweb", url="https://cloud.example.org/dicomweb")
    study, instances = study_with_instances(1, 4)
    pending = [
        job(pacs, instances[0], State.PENDING, age=timedelta(minutes=30), attempts=2, last_error="timeout"),
        job(pacs, instances[1], State.PENDING, age=timedelta(minutes=1)),
    ]
    dead = job(pacs, instances[2], State.DEAD, age=timedelta(hours=2), attempts=20, last_error="refused")
    delivered = job(pacs, instances[3], State.DELIVERED, age=timedelta(minutes=10))
    attempt(delivered, Outcome.DELIVERED, at=timezone.now() - timedelta(minutes=5))
    attempt(dead, Outcome.DEAD, at=timezone.now() - timedelta(minutes=50), error="refused")
    return {"pacs": pacs, "cloud": cloud, "study": study, "pending": pending, "dead": dead, "delivered": delivered}


def test_destination_list_shows_each_queue(admin_client, queue):
    page = admin_client.get(DESTINATIONS).content.decode()
    pacs = row(page, "queue-pacs")
    assert cell(pacs, "queue-pending") == "2" and cell(pacs, "queue-dead") == "1"
    assert cell(pacs, "queue-oldest").startswith("30")
    assert cell(pacs, "queue-delivered") == "1 / 1" and cell(pacs, "queue-failed") == "1 / 1"
    assert "association rejected" in cell(pacs, "queue-error")
    cloud = row(page, "queue-cloud")
    assert cell(cloud, "queue-pending") == "0" and cell(cloud, "queue-oldest") == "&ndash;"
    assert f"?destination__id__exact={queue['pacs'].pk}&amp;state__exact=dead" in pacs


def test_destination_list_queries_do_not_grow_with_destinations(admin_client, queue, django_assert_max_num_queries):
    admin_client.get(DESTINATIONS)
    with django_assert_max_num_queries(15) as few:
        admin_client.get(DESTINATIONS)
    for number in range(15):
        dimse_destination(f"more-{number}")
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert "queue-more-14" in admin_client.get(DESTINATIONS).content.decode()


def test_dashboard_shows_the_forwarding_queues(admin_client, queue):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert 'id="dashboard-routing"' in page
    assert cell(row(page, "queue-pacs"), "queue-pending") == "2"


def test_job_list_filters_by_state_destination_and_study_uid(admin_client, queue):
    pacs = queue["pacs"]
    page = admin_client.get(JOBS, {"state__exact": "dead"}).content.decode()
    assert queue["dead"].instance.sop_instance_uid in page
    assert queue["pending"][0].instance.sop_instance_uid not in page
    page = admin_client.get(JOBS, {"destination__id__exact": pacs.pk, "state__exact": "pending"}).content.decode()
    assert all(j.instance.sop_instance_uid in page for j in queue["pending"])
    other_study, other = study_with_instances(2, 1)
    job(pacs, other[0], State.PENDING, age=timedelta(minutes=1))
    page = admin_client.get(JOBS, {"q": other_study.study_instance_uid}).content.decode()
    assert other[0].sop_instance_uid in page and queue["dead"].instance.sop_instance_uid not in page


def test_job_page_explains_a_dead_letter_with_its_attempts(admin_client, queue):
    url = reverse("admin:routing_forwardjob_change", args=[queue["dead"].pk])
    page = admin_client.get(url).content.decode()
    assert "refused" in page and "Failed permanently" in page


def post_action(client, url: str, action: str, objects, **extra):
    data = {"action": action, ACTION_CHECKBOX_NAME: [obj.pk for obj in objects], **extra}
    return client.post(url, data, follow=True)


def test_retry_and_cancel_actions(admin_client, queue):
    response = post_action(admin_client, JOBS, "retry", [queue["dead"]], index=0)
    assert "1 job(s) queued for delivery now." in response.content.decode()
    queue["dead"].refresh_from_db()
    assert queue["dead"].state == State.PENDING and queue["dead"].attempts == 0
    response = post_action(admin_client, JOBS, "cancel", [*queue["pending"], queue["delivered"]], index=0)
    assert "2 job(s) cancelled." in response.content.decode()
    assert ForwardJob.objects.filter(state=State.CANCELLED).count() == 2
    assert ForwardJob.objects.get(pk=queue["delivered"].pk).state == State.DELIVERED


def test_redrive_pause_and_resume_destination_actions(admin_client, queue):
    pacs = queue["pacs"]
    response = post_action(admin_client, DESTINATIONS, "redrive_dead", [pacs], index=0)
    assert "1 dead job(s) queued for delivery again." in response.content.decode()
    assert not ForwardJob.objects.filter(state=State.DEAD).exists()
    post_action(admin_client, DESTINATIONS, "pause", [pacs], index=0)
    pacs.refresh_from_db()
    assert pacs.paused
    assert cell(row(admin_client.get(DESTINATIONS).content.decode(), "queue-pacs"), "queue-pending") == "3"
    assert "paused" in row(admin_client.get(DESTINATIONS).content.decode(), "queue-pacs")
    post_action(admin_client, DESTINATIONS, "resume", [pacs], index=0)
    pacs.refresh_from_db()
    assert not pacs.paused


@pytest.mark.django_db(transaction=True)  # Verify runs in threads, which need committed rows
def test_verify_shows_each_destination_result(admin_client, storescp):
    reachable = dimse_destination("reachable", port=storescp["port"])
    reachable.node.ae_title = storescp["ae_title"]
    reachable.node.save()
    closed = dimse_destination("closed", port=free_port())
    web = Destination.objects.create(name="web", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    response = post_action(admin_client, DESTINATIONS, "verify", [reachable, closed, web], index=0)
    page = response.content.decode()
    assert response.status_code == 200
    assert "1 of 3 destinations answered." in page
    verdicts = re.findall(r'<tr class="verify-(ok|failed)">\s*<td><a[^>]*>([^<]+)</a>', page)
    results = {name: outcome for outcome, name in verdicts}
    assert results == {"reachable": "ok", "closed": "failed", "web": "failed"}, page


def rule_form(**fields) -> dict:
    return {"name": "ct-rule", "order": 10, "enabled": "on", "conditions": '{"Modality": "CT"}', **fields}


def test_rule_admin_validates_conditions_and_saves_destinations(admin_client, queue):
    add = reverse("admin:routing_rule_add")
    destinations = [queue["pacs"].pk, queue["cloud"].pk]
    page = admin_client.post(add, rule_form(conditions='{"Modality": "re:(CT", "Modalty": "CT"}',
                                            destinations=destinations)).content.decode()  # fmt: skip
    assert "Modality: bad regular expression" in page and "Modalty: &#x27;Modalty&#x27; is not a DICOM keyword" in page
    page = admin_client.post(add, rule_form(conditions="[1, 2]", destinations=destinations)).content.decode()
    assert "conditions must be a mapping" in page
    assert not Rule.objects.exists()

    response = admin_client.post(add, rule_form(destinations=destinations))
    assert response.status_code == 302
    rule = Rule.objects.get(name="ct-rule")
    assert rule.conditions == {"Modality": "CT"} and set(rule.destinations.all()) == {queue["pacs"], queue["cloud"]}
    page = admin_client.get(reverse("admin:routing_rule_changelist")).content.decode()
    assert "<code>Modality=CT</code>" in page and "cloud, pacs" in page
    assert "selectfilter" in admin_client.get(add).content.decode().lower()  # filter_horizontal's widget


def test_send_studies_to_a_destination_from_the_studies_browser(admin_client, queue):
    studies = reverse("admin:gateway_study_changelist")
    other_study, _ = study_with_instances(2, 3)
    response = post_action(admin_client, studies, "send_to_destination", [queue["study"], other_study], index=0)
    page = response.content.decode()
    assert 'id="send-studies"' in page and other_study.study_instance_uid in page
    assert ForwardJob.objects.filter(destination=queue["cloud"]).count() == 0

    response = post_action(
        admin_client, studies, "send_to_destination", [queue["study"], other_study], apply="1",
        destination=queue["cloud"].pk,
    )  # fmt: skip
    assert "7 instance(s) of 2 study(ies) queued for cloud." in response.content.decode()
    jobs = ForwardJob.objects.filter(destination=queue["cloud"], state=State.PENDING)
    assert jobs.count() == 7 and set(jobs.values_list("study_instance_uid", flat=True)) == {
        queue["study"].study_instance_uid, other_study.study_instance_uid
    }  # fmt: skip


def test_destination_form_never_shows_secrets_and_blank_keeps_them(admin_client, db):
    cloud = Destination.objects.create(
        name="cloud", kind="dicomweb", url="https://cloud.example.org/dicomweb", auth="bearer", token="s3cret"
    )
    url = reverse("admin:routing_destination_change", args=[cloud.pk])
    page = admin_client.get(url).content.decode()
    assert "s3cret" not in page and "leave blank to keep it" in page
    form = stow_destination_form(cloud, max_concurrency=3, read_timeout=60)
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:3000]
    cloud.refresh_from_db()
    assert cloud.token == "s3cret" and cloud.max_concurrency == 3 and cloud.read_timeout == 60
    admin_client.post(url, {**form, "token": "rotated"})
    cloud.refresh_from_db()
    assert cloud.token == "rotated"
