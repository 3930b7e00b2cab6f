"""API tokens from the shell and the admin: shown once, stored hashed, working at once, revocable."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO

import pytest
import requests
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone

from dicomweb.models import ApiToken, hash_token
from tests.conftest import manage

TOKEN_RE = re.compile(r"isth_[A-Za-z0-9_-]{40,}")


def create_token(*args: str) -> str:
    out = StringIO()
    call_command("create_token", *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip()


def capabilities(live_server, raw: str) -> int:
    return requests.get(
        f"{live_server.url}/dicomweb/", headers={"Authorization": f"Bearer {raw}"}, timeout=10
    ).status_code


def test_create_token_prints_a_token_that_works(live_server, transactional_db):
    raw = create_token("viewer", "--scope", "read,write", "--expires", "90d")

    assert TOKEN_RE.fullmatch(raw)
    token = ApiToken.objects.get(name="viewer")
    assert (token.can_read, token.can_write, token.key_hash) == (True, True, hash_token(raw))
    assert raw not in token.key_hash and raw.startswith(token.prefix)
    assert timedelta(days=89) < token.expires_at - timezone.now() <= timedelta(days=90)
    assert capabilities(live_server, raw) == 200


def test_create_token_with_admin_scope_from_the_command_line(live_server, transactional_db):
    """`manage.py create_token provisioning --scope admin`, as an administrator types it."""
    created = manage("create_token", "provisioning", "--scope", "admin")

    assert created.returncode == 0, created.stderr
    raw = created.stdout.strip()
    assert TOKEN_RE.fullmatch(raw) and "(admin)" in created.stderr
    token = ApiToken.objects.get(name="provisioning")
    assert token.scopes() == ["admin"] and token.key_hash == hash_token(raw)
    headers = {"Authorization": f"Bearer {raw}"}
    assert requests.get(f"{live_server.url}/api/nodes/", headers=headers, timeout=10).status_code == 200
    assert capabilities(live_server, raw) == 403  # admin is not read: no DICOMweb
    listed = manage("list_tokens").stdout
    assert next(line for line in listed.splitlines() if line.startswith("provisioning")).split()[2] == "admin"


def test_revoke_token_stops_it_at_once(live_server, transactional_db):
    raw = create_token("script", "--scope", "read")
    assert capabilities(live_server, raw) == 200

    call_command("revoke_token", "script", stdout=StringIO())

    assert capabilities(live_server, raw) == 401
    with pytest.raises(CommandError):
        call_command("revoke_token", "nobody", stdout=StringIO())


def test_list_tokens_never_shows_the_token(transactional_db):
    raw = create_token("viewer", "--scope", "read", "--expires", "2030-01-31T00:00:00Z")
    out = StringIO()

    call_command("list_tokens", stdout=out)

    line = next(line for line in out.getvalue().splitlines() if line.startswith("viewer"))
    assert raw[:11] in line and raw not in out.getvalue()
    assert "2030-01-31" in line and "active" in line


@pytest.mark.parametrize(
    "args",
    [("--scope", "superuser"), ("--scope", "read,all"), ("--scope", ""), ("--expires", "soon"), ("--expires", "90x")],
)
def test_create_token_refuses_bad_options(transactional_db, args):
    with pytest.raises(CommandError):
        create_token("viewer", *args)
    assert not ApiToken.objects.exists()


def test_create_token_refuses_a_taken_name(transactional_db):
    create_token("viewer")
    with pytest.raises(CommandError):
        create_token("viewer")


def test_admin_shows_a_new_token_once_and_revokes(client, live_server, transactional_db):
    client.force_login(User.objects.create_superuser("admin", "admin@example.org", "pw"))

    page = client.post(
        "/admin/dicomweb/apitoken/add/",
        {"name": "ohif", "can_read": "on", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )

    shown = TOKEN_RE.findall(page.content.decode())
    assert len(shown) == 1
    token = ApiToken.objects.get(name="ohif")
    assert token.key_hash == hash_token(shown[0]) and (token.can_read, token.can_write) == (True, False)
    assert capabilities(live_server, shown[0]) == 200
    listing = client.get("/admin/dicomweb/apitoken/").content.decode()
    assert token.prefix in listing and not TOKEN_RE.search(listing)

    client.post("/admin/dicomweb/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})

    assert ApiToken.objects.get(name="ohif").revoked
    assert capabilities(live_server, shown[0]) == 401


def test_admin_issues_a_token_with_admin_scope_only(client, live_server, transactional_db):
    client.force_login(User.objects.create_superuser("admin", "admin@example.org", "pw"))
    form = client.get("/admin/dicomweb/apitoken/add/").content.decode()
    assert 'name="can_admin"' in form and 'name="can_worklist"' in form

    page = client.post(
        "/admin/dicomweb/apitoken/add/",
        {"name": "provisioning", "can_admin": "on", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )

    (raw,) = TOKEN_RE.findall(page.content.decode())
    assert ApiToken.objects.get(name="provisioning").scopes() == ["admin"]
    headers = {"Authorization": f"Bearer {raw}"}
    assert requests.get(f"{live_server.url}/api/nodes/", headers=headers, timeout=10).status_code == 200
    assert capabilities(live_server, raw) == 403
