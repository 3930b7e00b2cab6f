"""Forwarding in /metrics (queue gauges read at scrape time, delivery counters) and in /healthz (degraded)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

from routing import metrics
from routing.models import ForwardJob
from tests.routing.operator_data import dimse_destination, job, study_with_instances

State = ForwardJob.State


def samples(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


@pytest.fixture
def backlog(transactional_db):
    """pacs owes 3 instances, the oldest for 20 minutes, and has 1 dead letter; idle owes nothing."""
    pacs, idle = dimse_destination("pacs"), dimse_destination("idle")
    _, instances = study_with_instances(1, 4)
    job(pacs, instances[0], State.PENDING, age=timedelta(minutes=20))
    job(pacs, instances[1], State.PENDING, age=timedelta(minutes=1))
    job(pacs, instances[2], State.PENDING, age=timedelta(seconds=5))
    job(pacs, instances[3], State.DEAD, age=timedelta(days=1))
    return pacs, idle


def test_metrics_show_queue_depth_dead_letters_and_oldest_age_per_destination(client, backlog):
    scraped = samples(client)
    assert scraped[("isthmus_forward_queue_depth", (("destination", "pacs"),))] == 3
    assert scraped[("isthmus_forward_queue_depth", (("destination", "idle"),))] == 0
    assert scraped[("isthmus_forward_dead_letters", (("destination", "pacs"),))] == 1
    assert 1190 < scraped[("isthmus_forward_oldest_pending_age_seconds", (("destination", "pacs"),))] < 1300
    assert scraped[("isthmus_forward_oldest_pending_age_seconds", (("destination", "idle"),))] == 0


def test_metrics_sum_what_the_delivery_code_records(client, transactional_db):
    before = samples(client)
    metrics.record_delivered("pacs", latency_seconds=0.3, size=1000)
    metrics.record_delivered("pacs", latency_seconds=7.0, size=500)
    metrics.record_outcome("pacs", "retry", count=4)
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("isthmus_forward_deliveries_total", destination="pacs", outcome="delivered") == 2
    assert delta("isthmus_forward_deliveries_total", destination="pacs", outcome="retry") == 4
    assert delta("isthmus_forward_bytes_total", destination="pacs") == 1500
    assert delta("isthmus_forward_latency_seconds_count", destination="pacs") == 2
    assert delta("isthmus_forward_latency_seconds_bucket", destination="pacs", le="0.5") == 1
    assert delta("isthmus_forward_latency_seconds_bucket", destination="pacs", le="10.0") == 2


def test_healthz_is_degraded_but_200_when_a_backlog_is_older_than_the_threshold(admin_client, listener, backlog):
    client = admin_client  # the detail is for staff and read tokens; anyone else gets the status
    with override_settings(ROUTING_BACKLOG_ALERT_SECONDS=600):
        assert Client().get("/healthz").json() == {"status": "degraded"}
        response = client.get("/healthz")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "degraded" and report["failing"] == [] and report["degraded"] == ["routing"]
    routing = report["checks"]["routing"]
    assert routing["ok"] is False and routing["threshold_seconds"] == 600
    assert [(o["destination"], o["pending"]) for o in routing["overdue"]] == [("pacs", 3)]
    assert "backlog older than 600 s at: pacs" in routing["error"]

    with override_settings(ROUTING_BACKLOG_ALERT_SECONDS=3600):
        report = client.get("/healthz").json()
    assert report["status"] == "ok" and report["degraded"] == [] and report["checks"]["routing"]["ok"] is True


def test_healthz_still_fails_first_when_a_critical_check_fails(admin_client, backlog):
    with override_settings(ROUTING_BACKLOG_ALERT_SECONDS=600):
        response = admin_client.get("/healthz")  # no DIMSE listener runs
    assert response.status_code == 503
    assert response.json()["status"] == "fail" and response.json()["degraded"] == ["routing"]


def test_a_real_delivery_shows_in_the_counters_and_empties_the_queue(
    client, storage, modality, listener, rings, orthanc, tmp_path
):
    """storescu -> Isthmus -> Orthanc, then /metrics: what the delivery code records, under the documented names."""
    from pydicom.uid import generate_uid

    from tests.gateway.instances import make_instance, storescu
    from tests.routing import conftest as routing

    pacs = routing.dimse_destination(orthanc, name="metrics-pacs")
    routing.rule("all-to-metrics-pacs", {}, pacs)
    study, series = generate_uid(), generate_uid()
    sent = [make_instance("CT_small.dcm", tmp_path, study_uid=study, series_uid=series) for _ in range(3)]
    before = samples(client)
    assert storescu(listener.port, sent).returncode == 0
    assert samples(client)[("isthmus_forward_queue_depth", (("destination", "metrics-pacs"),))] == 3

    routing.drain()

    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("isthmus_forward_deliveries_total", destination="metrics-pacs", outcome="delivered") == 3
    assert delta("isthmus_forward_latency_seconds_count", destination="metrics-pacs") == 3
    size = sum(path.stat().st_size for path in sent)  # stored with Isthmus's own file meta: about the same
    assert 0.9 * size < delta("isthmus_forward_bytes_total", destination="metrics-pacs") < 1.1 * size
    labels = (("destination", "metrics-pacs"),)
    assert after[("isthmus_forward_queue_depth", labels)] == 0
