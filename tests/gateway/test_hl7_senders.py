"""HL7 senders as an administrator registers them, and the decision applied to each message's address and type."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from gateway import hl7_senders
from gateway.models import Hl7Refusal, Hl7Sender

pytestmark = pytest.mark.django_db


def test_admin_adds_a_sender_with_types_typed_as_text_and_refuses_a_hostname(admin_client):
    add = reverse("admin:gateway_hl7sender_add")
    page = admin_client.post(add, {"name": "ris", "host": "10.1.2.3", "message_types": "orm^o01, ADT^A08",
                                   "description": "", "enabled": "on"})  # fmt: skip
    assert page.status_code == 302
    assert Hl7Sender.objects.get(name="ris").message_types == ["ORM^O01", "ADT^A08"]
    listing = admin_client.get(reverse("admin:gateway_hl7sender_changelist")).content.decode()
    assert "ORM^O01, ADT^A08" in listing and "never" in listing

    page = admin_client.post(add, {"name": "engine", "host": "engine.example.org", "message_types": "",
                                   "enabled": "on"})  # fmt: skip
    assert page.status_code == 200 and "An IP address (10.1.2.3) or a network" in page.content.decode()
    page = admin_client.post(add, {"name": "engine", "host": "10.0.0.0/8", "message_types": "ORM", "enabled": "on"})
    assert "Not a message type" in page.content.decode()
    assert list(Hl7Sender.objects.values_list("name", flat=True)) == ["ris"]


def test_refusals_are_listed_and_cannot_be_edited_or_deleted(admin_client):
    now = timezone.now()
    refusal = Hl7Refusal.objects.create(peer_address="10.9.9.9", reason="unknown-sender", message_type="ORM^O01",
                                        control_id="C1", count=3, first_at=now, last_at=now)  # fmt: skip
    listing = admin_client.get(reverse("admin:gateway_hl7refusal_changelist")).content.decode()
    assert "10.9.9.9" in listing and "No enabled HL7 sender covers the address" in listing
    assert (
        admin_client.post(reverse("admin:gateway_hl7refusal_delete", args=[refusal.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert Hl7Refusal.objects.filter(pk=refusal.pk).exists()


def test_the_narrowest_enabled_network_decides_which_types_an_address_may_send():
    Hl7Sender.objects.create(name="engine", host="10.20.0.0/16")
    Hl7Sender.objects.create(name="adt-feed", host="10.20.5.7", message_types=["ADT^A08"])
    Hl7Sender.objects.create(name="old-ris", host="10.30.0.1", enabled=False)

    assert hl7_senders.decide(address="10.20.1.1", message_type="ORM^O01").sender.name == "engine"
    narrow = hl7_senders.decide(address="10.20.5.7", message_type="ORM^O01")
    assert (narrow.accepted, narrow.reason, narrow.text) == (
        False,
        "type-not-allowed",
        "sender adt-feed may not send ORM^O01",
    )
    assert hl7_senders.decide(address="10.20.5.7", message_type="ADT^A08").sender.name == "adt-feed"
    for address in ("10.30.0.1", "192.168.1.1", "not-an-address"):
        verdict = hl7_senders.decide(address=address, message_type="ADT^A08")
        assert (verdict.accepted, verdict.reason) == (False, "unknown-sender")
    with override_settings(REQUIRE_KNOWN_HL7_SENDER=False):
        assert hl7_senders.decide(address="192.168.1.1", message_type="ORM^O01").accepted
        assert not hl7_senders.decide(address="10.20.5.7", message_type="ORM^O01").accepted  # types still hold


def test_peer_names_give_the_address_senders_are_matched_on():
    assert hl7_senders.peer_ip("10.1.2.3:40000") == "10.1.2.3"
    assert hl7_senders.peer_ip("::ffff:10.1.2.3:40000") == "10.1.2.3"
    assert hl7_senders.peer_ip("fe80::1%eth0:40000") == "fe80::1"


def test_refusals_are_counted_per_address_and_reason_and_pruned_after_retention():
    verdict = hl7_senders.Verdict(False, "unknown-sender", text="10.9.9.9 is not a registered HL7 sender")
    for control_id in ("C1", "C2", "C3"):
        hl7_senders.record_refusal(verdict=verdict, address="10.9.9.9", message_type="ORM^O01", control_id=control_id)
    (row,) = Hl7Refusal.objects.all()
    assert (row.count, row.control_id, row.message_type) == (3, "C3", "ORM^O01")
    assert hl7_senders.prune_refusals(older_than_days=1) == 0
    Hl7Refusal.objects.update(last_at=timezone.now() - timedelta(days=2))
    assert hl7_senders.prune_refusals(older_than_days=1) == 1
