"""Guessing on the web port: bad tokens and bad passwords are limited per source; Basic login is opt-in."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.cache import caches
from django.utils import timezone
from rest_framework.test import APIClient

from dicomweb.models import ApiToken

BLOCK_LOG = "isthmus.web"


def get(live_server, path: str, token: str, source: str = "127.0.0.1") -> http.client.HTTPResponse:
    """A GET from `source` (any 127.0.0.0/8 address reaches the loopback server) with a bearer token."""
    connection = http.client.HTTPConnection(live_server.thread.host, live_server.thread.port, timeout=10,
                                            source_address=(source, 0))  # fmt: skip
    connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    response.body = response.read()
    connection.close()
    return response


def test_bad_tokens_block_their_address_until_the_window_ends(live_server, transactional_db, settings, caplog):
    settings.TOKEN_FAILURE_LIMIT, settings.TOKEN_FAILURE_WINDOW = 3, 2
    _good, good = ApiToken.issue("viewer", read=True, admin=True)
    _old, expired = ApiToken.issue("old", expires_at=timezone.now() - timedelta(days=1))
    _gone, revoked = ApiToken.issue("gone")
    ApiToken.objects.filter(name="gone").update(revoked=True)
    caplog.set_level(logging.INFO, logger=BLOCK_LOG)

    tries = [get(live_server, "/dicomweb/studies", bad) for bad in ("isth_guess", expired, revoked, "a.b.c")]
    blocked = [get(live_server, path, good) for path in ("/dicomweb/studies", "/api/nodes/")]
    elsewhere = get(live_server, "/dicomweb/studies", good, source="127.0.0.2")

    assert [response.status for response in tries] == [401, 401, 401, 429]
    for response in blocked:
        problem = json.loads(response.body)
        assert response.status == 429 and response.getheader("Content-Type") == "application/problem+json"
        assert problem["status"] == 429 and "try again" in problem["detail"]
        assert 1 <= int(response.getheader("Retry-After")) <= 2
    assert elsewhere.status == 200  # another address is not affected
    blocks = [record.getMessage() for record in caplog.records if record.name == BLOCK_LOG]
    assert blocks == ["bearer tokens from 127.0.0.1 refused for 2 s: more than 3 failures"]

    time.sleep(int(blocked[-1].getheader("Retry-After")) + 0.2)

    assert get(live_server, "/dicomweb/studies", good).status == 200


def test_good_tokens_write_nothing_to_the_limits_cache(live_server, transactional_db):
    """The DICOMweb hot path reads the cache once (is this address blocked?) and never writes it."""
    _token, raw = ApiToken.issue("viewer")
    cache_dir = Path(caches["ratelimit"]._dir)

    answers = {get(live_server, "/dicomweb/studies", raw).status for _ in range(20)}

    assert answers == {200}
    assert list(cache_dir.glob("*")) == []


@pytest.fixture
def staff(db) -> User:
    User.objects.create_superuser("other", "other@example.org", "other-password-for-tests")
    return User.objects.create_superuser("admin", "admin@example.org", "right-password-for-tests")


def login(client, address: str, username: str, password: str) -> str:
    client.logout()
    page = client.post("/admin/login/?next=/admin/", {"username": username, "password": password},
                       REMOTE_ADDR=address, follow=True)  # fmt: skip
    return "logged in" if page.context and page.context["user"].is_authenticated else page.content.decode()


def test_admin_login_locks_out_an_address_and_a_user_name(client, staff, settings, caplog):
    settings.LOGIN_FAILURE_LIMIT = 3
    caplog.set_level(logging.INFO, logger=BLOCK_LOG)

    failures = [login(client, "10.0.0.1", "admin", f"guess-{n}") for n in range(4)]
    right_password_same_address = login(client, "10.0.0.1", "admin", "right-password-for-tests")
    same_user_elsewhere = login(client, "10.0.0.2", "admin", "right-password-for-tests")
    other_user_elsewhere = login(client, "10.0.0.2", "other", "other-password-for-tests")

    assert all("Please enter the correct username and password" in page for page in failures)
    assert "Too many failed logins. Try again in 15 minutes." in right_password_same_address
    assert "Too many failed logins" in same_user_elsewhere
    assert other_user_elsewhere == "logged in"
    blocks = [record.getMessage() for record in caplog.records if record.name == BLOCK_LOG]
    assert len(blocks) == 2 and "from 10.0.0.1" in blocks[0] and "10.0.0.1" in blocks[1]
    assert not any("admin" in line or "guess" in line for line in caplog.text.splitlines())


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_basic_login_on_the_api_is_off_unless_enabled(staff, settings):
    api = APIClient(HTTP_AUTHORIZATION=basic("admin", "right-password-for-tests"))

    assert api.get("/api/nodes/").status_code == 403  # the header is ignored: an anonymous request

    settings.API_BASIC_AUTH = True
    assert api.get("/api/nodes/").status_code == 200


def test_basic_login_failures_count_toward_the_login_limit(staff, settings):
    settings.API_BASIC_AUTH, settings.LOGIN_FAILURE_LIMIT = True, 2
    guesses = [APIClient(HTTP_AUTHORIZATION=basic("admin", f"guess-{n}")).get("/api/nodes/") for n in range(3)]

    refused = APIClient(HTTP_AUTHORIZATION=basic("admin", "right-password-for-tests")).get("/api/nodes/")

    assert [response.status_code for response in guesses] == [403, 403, 403]
    assert refused.status_code == 429 and refused["Content-Type"] == "application/problem+json"
    assert int(refused["Retry-After"]) > 0
