"""Least privilege for nodes: a new node may send, ask for its worklist and report, not read the archive back."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from gateway import services
from gateway.config_file import import_config
from gateway.models import AssociationEvent, Node

DEFAULT_ON = ("echo", "store", "worklist", "mpps", "commitment")


def granted(node: Node) -> dict[str, bool]:
    return {service: node.allows(service) for service in (*DEFAULT_ON, "query_retrieve")}


EXPECTED = {**dict.fromkeys(DEFAULT_ON, True), "query_retrieve": False}


@pytest.fixture
def superuser_client(client, db):
    client.force_login(User.objects.create_superuser("admin", "admin@example.org", "pw-for-tests-only"))
    return client


def test_a_node_created_through_the_api_has_no_query_retrieve(db):
    from rest_framework.test import APIClient

    from dicomweb.models import ApiToken

    _token, raw = ApiToken.issue("provisioning", read=False, admin=True)
    api = APIClient(HTTP_AUTHORIZATION=f"Bearer {raw}")

    created = api.post(
        "/api/nodes/", {"name": "ct-1", "ae_title": "CT1", "host": "10.1.2.3", "port": 104}, format="json"
    )

    assert created.status_code == 201, created.content
    assert created.json()["allow_query_retrieve"] is False
    assert granted(Node.objects.get(name="ct-1")) == EXPECTED


def test_the_admin_add_form_offers_query_retrieve_unticked(superuser_client):
    form = superuser_client.get("/admin/gateway/node/add/").content.decode()
    checkboxes = {name: tag for tag, name in re.findall(r'(<input type="checkbox" name="(allow_\w+)"[^>]*>)', form)}
    checked = {name: " checked" in tag for name, tag in checkboxes.items()}
    assert checked == {f"allow_{service}": allowed for service, allowed in EXPECTED.items()}

    fields = {"name": "ct-1", "ae_title": "CT1", "host": "10.1.2.3", "port": "104", "enabled": "on"}
    fields.update({"allowed_in": "on", "allowed_out": "on"}, **{f"allow_{s}": "on" for s in DEFAULT_ON})
    superuser_client.post("/admin/gateway/node/add/", fields)

    assert granted(Node.objects.get(name="ct-1")) == EXPECTED


def test_a_node_imported_without_services_has_no_query_retrieve(db):
    import_config("nodes:\n  - {name: ct-1, ae_title: CT1, host: 10.1.2.3, port: 104}\n")

    assert granted(Node.objects.get(name="ct-1")) == EXPECTED


def test_a_node_keeps_query_retrieve_once_granted_and_a_file_can_grant_it(db):
    Node.objects.create(name="ws-1", ae_title="WS1", host="10.1.2.4", allow_query_retrieve=True)
    import_config(
        "nodes:\n  - {name: ws-1, ae_title: WS1, host: 10.1.2.4, port: 104}\n"
        "  - {name: ws-2, ae_title: WS2, host: 10.1.2.5, port: 104, allow_query_retrieve: true}\n"
    )

    assert Node.objects.get(name="ws-1").allow_query_retrieve  # a file that does not say keeps what is there
    assert Node.objects.get(name="ws-2").allow_query_retrieve


def test_association_events_cannot_be_deleted_in_the_admin_only_pruned(superuser_client):
    old, recent = (
        AssociationEvent.objects.create(
            at=timezone.now() - timedelta(days=age),
            accepted=False,
            reason="calling-ae-unknown",
            calling_ae="ROGUE",
            called_ae="ISTHMUS",
            peer_address="10.9.9.9",
        )  # fmt: skip
        for age in (400, 1)
    )
    listing = superuser_client.get("/admin/gateway/associationevent/")
    assert listing.status_code == 200 and "delete_selected" not in listing.content.decode()

    action = {"action": "delete_selected", "_selected_action": [old.pk, recent.pk], "post": "yes"}
    superuser_client.post("/admin/gateway/associationevent/", action)
    delete_page = superuser_client.post(f"/admin/gateway/associationevent/{old.pk}/delete/", {"post": "yes"})
    detail = superuser_client.get(f"/admin/gateway/associationevent/{old.pk}/change/").content.decode()

    assert delete_page.status_code == 403
    assert 'name="_save"' not in detail  # view only
    assert AssociationEvent.objects.count() == 2

    assert services.prune_association_events(older_than_days=90) == 1
    assert list(AssociationEvent.objects.values_list("pk", flat=True)) == [recent.pk]
