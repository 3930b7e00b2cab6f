"""Configuration as a file: export, import, diff, and all-or-nothing errors."""

from __future__ import annotations

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from gateway.config_file import ConfigError, export_config, import_config
from gateway.models import Hl7Sender, Node
from tests.conftest import manage

pytestmark = pytest.mark.django_db

EXAMPLE = """
nodes:
  - name: ct-1
    ae_title: CT1
    host: 10.1.2.3
    port: 104
  - name: pacs
    ae_title: MAINPACS
    host: pacs.example.org
    port: 11112
    allowed_in: false
    description: Hospital archive
destinations: []
rules: []
"""


def test_minimal_node_gets_sensible_defaults():
    changes = import_config(EXAMPLE)
    assert [str(c).split(":")[0] for c in changes] == ["+ node ct-1", "+ node pacs"]
    ct = Node.objects.get(name="ct-1")
    assert ct.enabled and ct.allowed_in and ct.allowed_out
    assert all(ct.allows(service) for service in ("echo", "store", "worklist", "mpps", "commitment"))
    assert not ct.allows("query_retrieve")  # reading the archive back is granted, not a default
    assert Node.objects.get(name="pacs").allowed_in is False


def test_export_then_import_round_trips_without_changes():
    import_config(EXAMPLE)
    exported = export_config()
    document = yaml.safe_load(exported)
    assert [n["name"] for n in document["nodes"]] == ["ct-1", "pacs"]
    assert document["nodes"][1]["description"] == "Hospital archive"
    assert import_config(exported) == []
    Node.objects.all().delete()
    import_config(exported)
    assert export_config() == exported


@pytest.mark.django_db(transaction=True)  # the command runs in its own process
def test_modified_file_shows_the_diff_and_dry_run_changes_nothing(tmp_path):
    import_config(EXAMPLE)
    Node.objects.create(name="added-by-hand", ae_title="ROGUE", host="10.9.9.9", port=104)
    document = yaml.safe_load(export_config())
    document["nodes"] = [n for n in document["nodes"] if n["name"] != "added-by-hand"]
    document["nodes"][0]["port"] = 4104
    document["nodes"][0]["allow_store"] = False
    document["nodes"].append({"name": "us-2", "ae_title": "US2", "host": "10.1.2.9", "port": 104})
    path = tmp_path / "isthmus.yaml"
    path.write_text(yaml.safe_dump(document))

    result = manage("import_config", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "~ node ct-1: port: 104 -> 4104; allow_store: True -> False" in lines
    assert any(line.startswith("+ node us-2: ae_title='US2'") for line in lines)
    assert "- node added-by-hand" in lines
    assert lines[-1] == "dry run: 1 added, 1 changed, 1 removed; nothing applied"
    assert Node.objects.get(name="ct-1").port == 104

    result = manage("import_config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "applied: 1 added, 1 changed, 1 removed"
    assert sorted(Node.objects.values_list("name", flat=True)) == ["ct-1", "pacs", "us-2"]
    assert Node.objects.get(name="ct-1").port == 4104
    assert manage("import_config", str(path)).stdout.strip() == "no changes: the configuration already matches the file"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nodes:\n  - {name: a, ae_title: A, host: h, port: 104, colour: red}\n", "node 'a': unknown field 'colour'"),
        ("nodes:\n  - {name: a, ae_title: A, host: h, port: 70000}\n", "node 'a': field 'port'"),
        ("nodes:\n  - {name: a, ae_title: 'BAD\\\\AE', host: h, port: 104}\n", "node 'a': field 'ae_title'"),
        ("nodes:\n  - {name: a, host: h, port: 104}\n", "node 'a': missing field 'ae_title'"),
        ("nodes:\n  - {name: a, ae_title: A, host: h, port: 104, enabled: perhaps}\n", "node 'a': field 'enabled'"),
        ("nodes: {}\n", "nodes: must be a list"),
        ("modalities: []\n", "unknown top-level key 'modalities'"),
        ("nodes: [\n", "not valid YAML"),
        ("hl7_senders:\n  - {name: ris, host: ris.example.org}\n", "HL7 sender 'ris': field 'host': An IP address"),
        ("hl7_senders:\n  - {name: ris, host: 10.1.2.3/24}\n", "the network is 10.1.2.0/24"),
        ("hl7_senders:\n  - {name: ris, host: 10.1.2.3, message_types: [ORM]}\n", "Not a message type (CODE^EVENT"),
        ("hl7_senders:\n  - {name: ris, host: 10.1.2.3, message_types: ORM^O01}\n", "field 'message_types': A list"),
        ("hl7_senders:\n  - {name: ris, message_types: []}\n", "HL7 sender 'ris': missing field 'host'"),
    ],
)
def test_bad_file_names_object_and_field_and_applies_nothing(text, error):
    good = "  - {name: fine, ae_title: FINE, host: h, port: 104}\n"
    text = text.replace("nodes:\n", "nodes:\n" + good, 1) if text.startswith("nodes:\n") else text
    with pytest.raises(ConfigError) as caught:
        import_config(text)
    assert any(error in message for message in caught.value.errors), caught.value.errors
    assert not Node.objects.exists()


def test_import_command_reports_errors_and_exit_status(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nodes:\n  - {name: a, ae_title: A, host: h, port: 0}\n")
    with pytest.raises(CommandError, match="1 error"):
        call_command("import_config", str(path))
    assert not Node.objects.exists()


HL7_SENDERS = """
hl7_senders:
  - name: ris
    host: 10.1.2.3
    message_types: [orm^o01, ADT^A08]
  - name: interface-engine
    host: 10.20.0.0/16
    description: all types from the engine's subnet
"""


def test_hl7_senders_round_trip_and_a_listed_section_is_the_whole_truth():
    changes = import_config(HL7_SENDERS)
    assert [str(c).split(":")[0] for c in changes] == ["+ HL7 sender ris", "+ HL7 sender interface-engine"]
    assert Hl7Sender.objects.get(name="ris").message_types == ["ORM^O01", "ADT^A08"]  # upper case, as in MSH-9
    exported = export_config()
    document = yaml.safe_load(exported)
    assert document["hl7_senders"] == [
        {"name": "interface-engine", "host": "10.20.0.0/16", "description": "all types from the engine's subnet",
         "enabled": True},
        {"name": "ris", "host": "10.1.2.3", "message_types": ["ORM^O01", "ADT^A08"], "enabled": True},
    ]  # fmt: skip
    assert import_config(exported) == []
    Hl7Sender.objects.all().delete()
    import_config(exported)
    assert export_config() == exported

    changes = import_config("hl7_senders:\n  - {name: ris, host: 10.1.2.3, message_types: [ADT^A08]}\n")
    assert [str(c) for c in changes] == [
        "~ HL7 sender ris: message_types: ['ORM^O01', 'ADT^A08'] -> ['ADT^A08']", "- HL7 sender interface-engine"]  # fmt: skip
    assert list(Hl7Sender.objects.values_list("name", flat=True)) == ["ris"]
    import_config("nodes: []\n")  # a file without the section leaves the senders alone
    assert Hl7Sender.objects.filter(name="ris").exists()
