"""Least privilege on the web port: each token scope opens its own door and no other, over a live server."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import requests

from gateway.models import Instance, Node
from tests.dicomweb.access import MULTIPART, multipart
from tests.gateway.instances import make_instance
from tests.worklist.test_orders_api import new_order

SCOPES = ("read", "write", "worklist", "admin")
# What a token with exactly one scope gets; a staff session may do all of it.
EXPECTED = {
    #                                       read write worklist admin
    ("GET", "/api/nodes/"):                 (403, 403, 403, 200),
    ("POST", "/api/nodes/"):                (403, 403, 403, 201),
    ("GET", "/api/worklist/orders/"):       (200, 403, 200, 403),
    ("POST", "/api/worklist/orders/"):      (403, 403, 201, 403),
    ("GET", "/dicomweb/studies"):           (200, 403, 403, 403),
    ("POST", "/dicomweb/studies"):          (403, 200, 403, 403),
    ("GET", "/api/schema/"):                (200, 200, 200, 200),
}  # fmt: skip


@pytest.fixture
def tokens(transactional_db) -> dict[str, dict[str, str]]:
    """One token per scope, issued as `create_token NAME --scope SCOPE` issues it."""
    from dicomweb.models import ApiToken

    headers = {}
    for scope in SCOPES:
        _token, raw = ApiToken.issue(scope, **{name: name == scope for name in SCOPES})
        headers[scope] = {"Authorization": f"Bearer {raw}"}
    return headers


def test_each_scope_opens_its_own_endpoints_only(live_server, tokens, settings, tmp_path: Path):
    settings.STORAGE_DIR = tmp_path / "storage"
    instance = make_instance("CT_small.dcm", tmp_path / "sent").read_bytes()
    numbers = itertools.count(1)

    def call(method: str, path: str, headers: dict[str, str]) -> int:
        number = next(numbers)
        url, options = f"{live_server.url}{path}", {"headers": headers, "timeout": 30}
        if method == "GET":
            return requests.get(url, **options).status_code
        if path == "/api/nodes/":
            node = {"name": f"mr-{number}", "ae_title": f"MR{number}", "host": "127.0.0.1", "port": 104}
            return requests.post(url, json=node, **options).status_code
        if path == "/api/worklist/orders/":
            return requests.post(url, json=new_order(f"SCOPE-{number}"), **options).status_code
        return requests.post(url, data=multipart(instance), headers={**headers, "Content-Type": MULTIPART},
                             timeout=30).status_code  # fmt: skip

    seen = {key: tuple(call(*key, tokens[scope]) for scope in SCOPES) for key in EXPECTED}

    assert seen == EXPECTED
    assert Node.objects.count() == 1 and Instance.objects.count() == 1


def test_a_write_token_cannot_create_a_node_and_an_admin_token_can(live_server, transactional_db):
    from dicomweb.models import ApiToken

    _w, write = ApiToken.issue("stow-gateway", read=True, write=True)
    _a, admin = ApiToken.issue("provisioning", read=False, admin=True)
    node = {"name": "mr-1", "ae_title": "MR1", "host": "10.1.2.3", "port": 104}

    def create(raw: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {raw}"}
        return requests.post(f"{live_server.url}/api/nodes/", json=node, headers=headers, timeout=10)

    refused = create(write)
    assert refused.status_code == 403 and not Node.objects.exists()

    created = create(admin)
    assert created.status_code == 201, created.content
    assert Node.objects.get(name="mr-1").ae_title == "MR1"
