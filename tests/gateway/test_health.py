"""/healthz and /metrics: real database, real broker, real listener; failures named."""

from __future__ import annotations

import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from gateway.models import Heartbeat
from tests.conftest import REDIS_URL, echoscu, free_port


def read_token(name: str = "monitor") -> dict[str, str]:
    from dicomweb.models import ApiToken

    _token, raw = ApiToken.issue(name, read=True)
    return {"Authorization": f"Bearer {raw}"}


def test_healthz_ok_when_all_is_well(admin_client, listener):
    response = admin_client.get("/healthz")  # a staff session sees the detail
    assert response.status_code == 200, response.json()
    report = response.json()
    assert report["status"] == "ok" and report["failing"] == []
    assert set(report["checks"]) >= {"database", "broker", "storage", "dimse"}
    assert report["checks"]["storage"]["free_bytes"] > 0
    assert report["checks"]["dimse"]["live"][0]["address"].endswith(f":{listener.port}")


def test_healthz_without_a_read_token_says_only_the_status(client, listener):
    from dicomweb.models import ApiToken

    _w, writer = ApiToken.issue("stow-only", read=False, write=True)
    detail = client.get("/healthz", headers=read_token())

    anonymous = client.get("/healthz")
    bad_token = client.get("/healthz", headers={"Authorization": "Bearer isth_not-a-token"})
    write_only = client.get("/healthz", headers={"Authorization": f"Bearer {writer}"})

    assert detail.status_code == 200 and str(listener.port) in detail.content.decode()
    for response in (anonymous, bad_token, write_only):
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}  # no paths, addresses, free space or error text


def test_healthz_fails_without_a_live_listener(client, transactional_db):
    anonymous = client.get("/healthz")
    response = client.get("/healthz", headers=read_token())
    assert anonymous.status_code == 503 and anonymous.json() == {"status": "fail"}
    assert response.status_code == 503
    assert response.json()["failing"] == ["dimse"]
    assert "heartbeat" in response.json()["checks"]["dimse"]["error"]


def test_listener_removes_its_heartbeat_on_stop(transactional_db):
    from gateway.dimse.server import Listener

    dimse = Listener("127.0.0.1", 0)
    dimse.start()
    assert Heartbeat.objects.filter(kind="dimse").count() == 1
    dimse.stop(grace=1)
    assert not Heartbeat.objects.filter(kind="dimse").exists()


@pytest.fixture
def identity_provider() -> tuple[rsa.RSAPrivateKey, str]:
    """A key pair: the private half signs monitoring JWTs, the public half (PEM) is given to the web server."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public.decode()


def test_healthz_503_names_the_database_when_it_is_down(web_with, identity_provider):
    """A JWT needs no database: the monitor still gets the detail that names what is down; others only 'fail'."""
    key, public_pem = identity_provider
    base = web_with(
        DATABASE_URL=f"postgres://isthmus@127.0.0.1:{free_port()}/isthmus", ISTHMUS_JWT_PUBLIC_KEY=public_pem
    )
    claims = {"sub": "monitoring", "scope": "dicomweb.read", "exp": int(time.time()) + 300}
    monitor = {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256')}"}

    anonymous = requests.get(f"{base}/healthz", timeout=30)
    response = requests.get(f"{base}/healthz", headers=monitor, timeout=30)

    assert anonymous.status_code == 503 and anonymous.json() == {"status": "fail"}
    assert response.status_code == 503
    report = response.json()
    assert "database" in report["failing"]
    assert report["checks"]["database"]["ok"] is False and "OperationalError" in report["checks"]["database"]["error"]


def test_healthz_503_names_the_broker_when_redis_is_unreachable(web_with):
    base = web_with(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    report = requests.get(f"{base}/healthz", headers=read_token(), timeout=30).json()
    assert "broker" in report["failing"]


def test_healthz_broker_ok_with_real_redis(web_with):
    base = web_with(CELERY_BROKER_URL=REDIS_URL)
    report = requests.get(f"{base}/healthz", headers=read_token(), timeout=30).json()
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
