"""/healthz and /metrics: real database, real broker, real listener; failures named."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.models import Heartbeat
from tests.conftest import REDIS_URL, echoscu, free_port, spawn_python, stop_process, wait_for_port


def test_healthz_ok_when_all_is_well(client, listener):
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()
    report = response.json()
    assert report["status"] == "ok" and report["failing"] == []
    assert set(report["checks"]) >= {"database", "broker", "storage", "dimse"}
    assert report["checks"]["storage"]["free_bytes"] > 0
    assert report["checks"]["dimse"]["live"][0]["address"].endswith(f":{listener.port}")


def test_healthz_fails_without_a_live_listener(client, transactional_db):
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["failing"] == ["dimse"]


def test_listener_removes_its_heartbeat_on_stop(transactional_db):
    from gateway.dimse.server import Listener

    dimse = Listener("127.0.0.1", 0)
    dimse.start()
    assert Heartbeat.objects.filter(kind="dimse").count() == 1
    dimse.stop(grace=1)
    assert not Heartbeat.objects.filter(kind="dimse").exists()


@pytest.fixture
def web_with(transactional_db):
    """Start the real web server (gunicorn) with some settings overridden; yields its base URL."""
    processes = []

    def start(**env_overrides: str) -> str:
        port = free_port()
        gunicorn = (
            "-m",
            "gunicorn",
            "gateway.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--no-control-socket",
        )
        process = spawn_python(*gunicorn, **env_overrides)
        processes.append(process)
        wait_for_port(port, process=process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        stop_process(process)


def test_healthz_503_names_the_database_when_it_is_down(web_with):
    base = web_with(DATABASE_URL=f"postgres://isthmus@127.0.0.1:{free_port()}/isthmus")
    response = requests.get(f"{base}/healthz", timeout=30)
    assert response.status_code == 503
    report = response.json()
    assert "database" in report["failing"]
    assert report["checks"]["database"]["ok"] is False and "OperationalError" in report["checks"]["database"]["error"]


def test_healthz_503_names_the_broker_when_redis_is_unreachable(web_with):
    base = web_with(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    report = requests.get(f"{base}/healthz", timeout=30).json()
    assert "broker" in report["failing"]


def test_healthz_broker_ok_with_real_redis(web_with):
    base = web_with(CELERY_BROKER_URL=REDIS_URL)
    report = requests.get(f"{base}/healthz", timeout=30).json()
    assert report["checks"]["broker"] == {"ok": True, "transport": "redis"}


def samples(client) -> dict[tuple, float]:
    text = client.get("/metrics").content.decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_associations_by_reason_and_requests_by_status(client, listener, modality):
    before = samples(client)
    assert echoscu(listener.port, "CT1").returncode == 0
    assert echoscu(listener.port, "NOBODY").returncode != 0
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("isthmus_dimse_associations_total", result="accepted", reason="accepted") == 1
    assert delta("isthmus_dimse_associations_total", result="rejected", reason="calling-ae-unknown") == 1
    assert delta("isthmus_dimse_requests_total", service="echo", status="0x0000") == 1
