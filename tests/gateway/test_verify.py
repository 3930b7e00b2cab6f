"""Verify (admin action) and `manage.py echo` against real peers: dcmtk storescp, our listener, closed ports."""

from __future__ import annotations

import socket
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from gateway import services
from gateway.models import Node
from tests.conftest import free_port


@pytest.fixture
def reachable(storescp, transactional_db) -> Node:
    return Node.objects.create(name="archive", ae_title="STORESCP", host="127.0.0.1", port=storescp["port"])


@pytest.fixture
def closed(transactional_db) -> Node:
    return Node.objects.create(name="gone", ae_title="GONE", host="127.0.0.1", port=free_port())


@pytest.fixture
def silent(transactional_db):
    """A port that completes the TCP handshake but never speaks DICOM."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    node = Node.objects.create(name="mute", ae_title="MUTE", host="127.0.0.1", port=server.getsockname()[1])
    yield node
    server.close()


def run_echo(name: str, *extra: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("echo", name, *extra, stdout=out)
        return 0, out.getvalue()
    except SystemExit as exc:
        return exc.code, out.getvalue()


def test_echo_command_reaches_storescp(reachable):
    code, output = run_echo("archive")
    assert code == 0
    assert "archive STORESCP@127.0.0.1" in output and "C-ECHO success in" in output and " ms" in output
    reachable.refresh_from_db()
    assert reachable.last_error == ""


def test_echo_command_reports_refused_connection(closed):
    code, output = run_echo("gone")
    assert code == 1
    assert "connection refused" in output
    closed.refresh_from_db()
    assert "connection refused" in closed.last_error and closed.last_error_at is not None


def test_echo_reports_association_rejection_with_reason(listener):
    node = Node.objects.create(name="us", ae_title="NOTISTHMUS", host="127.0.0.1", port=listener.port)
    result = services.verify_node(node=node)
    assert not result.ok
    assert result.message == "association rejected (permanent): called AE title not recognised"


def test_echo_reports_timeout(silent):
    result = services.verify_node(node=silent, timeout=1)
    assert not result.ok
    assert result.message.startswith("timeout")


def test_echo_command_unknown_node_is_an_error(transactional_db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no node named 'nobody'"):
        call_command("echo", "nobody")


def test_verify_admin_action_shows_each_result(client, reachable, closed):
    admin = User.objects.create_superuser("admin", "admin@example.org", "pw-for-tests-only")
    client.force_login(admin)
    response = client.post(
        "/admin/gateway/node/",
        {"action": "verify", "_selected_action": [reachable.pk, closed.pk]},
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "1 of 2 nodes answered C-ECHO." in page
    rows = {row.split("</td>")[0].split(">")[-2].split("<")[0]: row for row in page.split('<tr class="verify-')[1:]}
    assert "C-ECHO success" in rows["archive"] and " ms" in rows["archive"]
    assert "connection refused" in rows["gone"]
