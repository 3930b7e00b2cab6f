"""Who may send HL7, over real MLLP sockets: clients bound to other loopback addresses play other hosts."""

from __future__ import annotations

import logging

from django.test import override_settings

from gateway import ratelimit
from gateway.models import Hl7Refusal, Hl7Sender
from tests.gateway.test_health import samples
from tests.worklist.hl7_messages import adt, err, exchange, msa, orm, pid
from worklist.models import Hl7Message, Order, Patient

PRIVATE = pid("SECRET42", "PRIVATE^PENNY", "19551231")


def test_a_host_not_on_the_list_gets_ar_and_nothing_is_applied(hl7_listener, client, caplog):
    caplog.set_level(logging.INFO, logger="isthmus.hl7")
    before = samples(client)
    (answer,) = exchange(hl7_listener, orm("X1", "NW", "ACC100", patient=PRIVATE), source="127.0.0.2")

    assert msa(answer)[1:4] == ["AR", "X1", "127.0.0.2 is not a registered HL7 sender"]
    assert err(answer)[3].startswith("207^")
    assert not Order.objects.exists() and not Patient.objects.exists() and not Hl7Message.objects.exists()
    refusal = Hl7Refusal.objects.get()
    assert (refusal.peer_address, refusal.reason, refusal.message_type, refusal.control_id, refusal.count) == (
        "127.0.0.2", "unknown-sender", "ORM^O01", "X1", 1)  # fmt: skip
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert line == "HL7 ORM^O01 control=X1 from 127.0.0.2 refused (unknown-sender): AR"
    for secret in ("SECRET42", "PRIVATE", "PENNY", "19551231"):
        assert secret not in caplog.text and secret not in answer
    key = ("isthmus_hl7_messages_total", (("ack", "AR"), ("reason", "unknown-sender")))
    assert samples(client)[key] - before.get(key, 0) == 1

    # The registered RIS on 127.0.0.1, on the same listener, is applied.
    assert msa(exchange(hl7_listener, orm("X2", "NW", "ACC100"))[0])[1] == "AA"
    assert Order.objects.filter(accession_number="ACC100").exists()
    assert Hl7Sender.objects.get(name="ris").last_seen_address == "127.0.0.1"


def test_a_sender_registered_as_a_network_is_applied_from_any_of_its_addresses(hl7_listener):
    Hl7Sender.objects.create(name="engine", host="127.0.0.0/24")
    (answer,) = exchange(hl7_listener, orm("N1", "NW", "ACC200"), source="127.0.0.2")
    assert msa(answer)[1] == "AA"
    assert Order.objects.get(accession_number="ACC200").steps.count() == 1
    engine = Hl7Sender.objects.get(name="engine")
    assert engine.last_seen_address == "127.0.0.2" and engine.last_seen_at is not None


def test_a_sender_limited_to_adt_a08_gets_ar_for_an_order(hl7_listener):
    Hl7Sender.objects.create(name="adt-feed", host="127.0.0.3", message_types=["ADT^A08"])
    refused, updated = exchange(hl7_listener, orm("T1", "NW", "ACC300"), adt("T2", "A08", pid("PAT300", "A08^ALLOWED")),
                                source="127.0.0.3")  # fmt: skip
    assert msa(refused)[1:4] == ["AR", "T1", "sender adt-feed may not send ORM\\S\\O01"]  # ^ escaped (HL7 2.7)
    assert err(refused)[3].startswith("200^")
    assert not Order.objects.exists()
    assert msa(updated)[1] == "AA" and Patient.objects.get(patient_id="PAT300").patient_name == "A08^ALLOWED"
    assert Hl7Refusal.objects.get().reason == "type-not-allowed"


def test_a_disabled_sender_is_refused_and_the_check_can_be_turned_off(hl7_listener):
    Hl7Sender.objects.filter(name="ris").update(enabled=False)
    assert msa(exchange(hl7_listener, orm("D1", "NW", "ACC400"))[0])[1] == "AR"
    with override_settings(REQUIRE_KNOWN_HL7_SENDER=False):  # ISTHMUS_REQUIRE_KNOWN_HL7_SENDER=false
        assert msa(exchange(hl7_listener, orm("D1", "NW", "ACC400"), source="127.0.0.2")[0])[1] == "AA"
    assert Order.objects.filter(accession_number="ACC400").count() == 1


def test_a_source_past_its_message_rate_gets_ar_and_may_retry_later(hl7_listener):
    Hl7Sender.objects.create(name="busy-ris", host="127.0.0.4")
    ratelimit.reset("hl7", "127.0.0.4")
    with override_settings(HL7_RATE_LIMIT=3, HL7_RATE_WINDOW=60):
        answers = exchange(hl7_listener, *(orm(f"L{n}", "NW", f"ACC50{n}") for n in range(4)), source="127.0.0.4")
    assert [msa(answer)[1] for answer in answers] == ["AA", "AA", "AA", "AR"]
    assert msa(answers[3])[3] == "more than 3 messages in 60 s from 127.0.0.4: retry later"
    assert not Order.objects.filter(accession_number="ACC503").exists()
    ratelimit.reset("hl7", "127.0.0.4")  # the window ends: the retry is applied
    assert msa(exchange(hl7_listener, orm("L3", "NW", "ACC503"), source="127.0.0.4")[0])[1] == "AA"
