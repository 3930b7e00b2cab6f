"""Who may use DICOMweb and the REST API: API tokens, JWTs from an identity provider, open read networks, CORS."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.utils import timezone

from dicomweb.models import ApiToken
from gateway.models import Instance, Node
from tests.dicomweb.access import MULTIPART, bearer, multipart
from tests.gateway.instances import make_instance

ISSUER, AUDIENCE = "https://idp.example.org/realms/radiology", "isthmus"


@pytest.fixture
def storage(settings, tmp_path, transactional_db) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


def capabilities(live_server, **headers) -> requests.Response:
    return requests.get(f"{live_server.url}/dicomweb/", headers=headers, timeout=10)


def stow(live_server, tmp_path: Path, **headers) -> requests.Response:
    body = multipart(make_instance("CT_small.dcm", tmp_path / "sent").read_bytes())
    return requests.post(
        f"{live_server.url}/dicomweb/studies", data=body, headers={"Content-Type": MULTIPART, **headers}, timeout=30
    )


def test_read_needs_a_usable_token(live_server, storage):
    expired = bearer(name="expired", expires_at=timezone.now() - timedelta(minutes=1))
    revoked = bearer(name="revoked")
    ApiToken.objects.filter(name="revoked").update(revoked=True)

    assert capabilities(live_server).status_code == 401
    assert capabilities(live_server, Authorization="Bearer isth_not-a-token").status_code == 401
    assert capabilities(live_server, **expired).status_code == 401
    assert capabilities(live_server, **revoked).status_code == 401
    assert capabilities(live_server, **bearer(name="writer", read=False, write=True)).status_code == 403
    assert capabilities(live_server, **bearer(name="reader", write=False)).status_code == 200


def test_token_use_is_recorded(live_server, storage):
    headers = bearer(write=False)

    assert capabilities(live_server, **headers).status_code == 200

    assert ApiToken.objects.get(name="viewer").last_used_at is not None


def test_read_only_token_cannot_store(live_server, storage, tmp_path):
    assert stow(live_server, tmp_path, **bearer(write=False)).status_code == 403
    assert Instance.objects.count() == 0


def test_open_read_network_reads_without_token_but_never_writes(live_server, storage, tmp_path, settings):
    settings.DICOMWEB_OPEN_READ_NETWORKS = [ipaddress.ip_network("10.0.0.0/8")]
    assert capabilities(live_server).status_code == 401

    settings.DICOMWEB_OPEN_READ_NETWORKS = [ipaddress.ip_network("127.0.0.0/8")]
    assert capabilities(live_server).status_code == 200
    assert stow(live_server, tmp_path).status_code == 401
    assert requests.get(f"{live_server.url}/api/nodes/", timeout=10).status_code in (401, 403)
    assert Instance.objects.count() == 0


def test_rest_api_reads_and_changes_nodes_with_admin_scope_only(live_server, storage):
    Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", port=104)
    reader, writer = bearer(name="reader", write=False), bearer(name="writer", read=False, write=True)
    admin = bearer(name="admin", read=False, write=False, admin=True)
    node = {"name": "mr-1", "ae_title": "MR1", "host": "127.0.0.1", "port": 104}

    def nodes(method: str, headers: dict, **body) -> requests.Response:
        return requests.request(method, f"{live_server.url}/api/nodes/", headers=headers, timeout=10, **body)

    assert nodes("GET", reader).status_code == 403  # which modalities exist, and where, is configuration
    assert nodes("POST", writer, json=node).status_code == 403  # write is STOW-RS only
    listed, created = nodes("GET", admin), nodes("POST", admin, json=node)

    assert listed.status_code == 200 and [entry["name"] for entry in listed.json()] == ["ct-1"]
    assert created.status_code == 201
    assert Node.objects.filter(name="mr-1").exists()


@pytest.fixture
def identity_provider(settings) -> rsa.RSAPrivateKey:
    """An RSA key pair whose public half is configured as the trusted JWT issuer's key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings.JWT_PUBLIC_KEY = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings.JWT_ISSUER, settings.JWT_AUDIENCE = ISSUER, AUDIENCE
    return key


def signed(key, **claims) -> dict[str, str]:
    now = timezone.now()
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "viewer-service-account",
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return {"Authorization": f"Bearer {jwt.encode(payload, key, algorithm='RS256')}"}


def test_jwt_with_write_scope_stores_as_its_subject(live_server, storage, tmp_path, identity_provider):
    headers = signed(identity_provider, scope="openid dicomweb.read dicomweb.write")

    assert stow(live_server, tmp_path, **headers).status_code == 200
    assert capabilities(live_server, **headers).status_code == 200
    assert Instance.objects.get().calling_ae == "viewer-service-a"


def test_jwt_scopes_are_enforced(live_server, storage, tmp_path, identity_provider):
    reader = signed(identity_provider, scope=None, scp=["dicomweb.read"])

    assert capabilities(live_server, **reader).status_code == 200
    assert stow(live_server, tmp_path, **reader).status_code == 403
    assert capabilities(live_server, **signed(identity_provider, scope="openid")).status_code == 403


def test_jwt_admin_claim_grants_the_node_registry(live_server, storage, identity_provider):
    admin = signed(identity_provider, scope="openid isthmus.admin")
    writer = signed(identity_provider, scope="dicomweb.read dicomweb.write")
    node = {"name": "mr-1", "ae_title": "MR1", "host": "127.0.0.1", "port": 104}

    refused = requests.post(f"{live_server.url}/api/nodes/", json=node, headers=writer, timeout=10)
    created = requests.post(f"{live_server.url}/api/nodes/", json=node, headers=admin, timeout=10)

    assert refused.status_code == 403
    assert created.status_code == 201 and Node.objects.filter(name="mr-1").exists()
    assert capabilities(live_server, **admin).status_code == 403  # admin is not read


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": "https://evil.example.org"}, id="other-issuer"),
        pytest.param({"aud": "another-service"}, id="other-audience"),
        pytest.param({"exp": timezone.now() - timedelta(minutes=5)}, id="expired"),
        pytest.param({"exp": None}, id="no-expiry"),
    ],
)
def test_jwt_with_wrong_claims_is_refused(live_server, storage, identity_provider, claims):
    response = capabilities(live_server, **signed(identity_provider, scope="dicomweb.read", **claims))

    assert response.status_code == 401


def test_jwt_signed_by_another_key_is_refused(live_server, storage, identity_provider):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    assert capabilities(live_server, **signed(stranger, scope="dicomweb.read")).status_code == 401


def test_jwt_is_refused_when_no_identity_provider_is_configured(live_server, storage, settings):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings.JWT_PUBLIC_KEY = ""

    assert capabilities(live_server, **signed(key, scope="dicomweb.read")).status_code == 401


def test_cors_preflight_answers_configured_origins_only(live_server, storage, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://viewer.example.org"]

    def preflight(origin: str) -> requests.Response:
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        return requests.options(f"{live_server.url}/dicomweb/studies", headers=headers, timeout=10)

    allowed, other = preflight("https://viewer.example.org"), preflight("https://elsewhere.example.org")

    assert allowed.headers.get("Access-Control-Allow-Origin") == "https://viewer.example.org"
    assert "authorization" in allowed.headers.get("Access-Control-Allow-Headers", "")
    assert "Access-Control-Allow-Origin" not in other.headers
