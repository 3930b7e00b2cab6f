"""Destinations and rules in the configuration file: references by name, secrets, conditions, all or nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.config_file import SECRET_MASK, ConfigError, export_config, import_config
from gateway.models import Node
from routing.models import Destination, Rule
from tests.conftest import manage

pytestmark = pytest.mark.django_db

EXAMPLE = """
nodes:
  - {name: ct-1, ae_title: CT1, host: 10.1.2.3, port: 104}
  - {name: pacs, ae_title: MAINPACS, host: pacs.example.org, port: 11112, allowed_in: false}
destinations:
  - name: main-pacs
    kind: dimse
    node: pacs
    max_concurrency: 4
  - name: cloud
    kind: dicomweb
    url: https://cloud.example.org/dicomweb
    auth: bearer
    token: s3cret-token
    read_timeout: 300
    retry_attempts: 30
rules:
  - name: ct-to-both
    order: 10
    conditions: {Modality: CT, CallingAE: "CT*", StudyDescription: "re:(?i)chest"}
    destinations: [main-pacs, cloud]
    stop: true
  - name: everything-else
    default: true
    conditions: {}
    destinations: [main-pacs]
"""


def test_example_creates_nodes_destinations_and_rules_referring_by_name():
    changes = import_config(EXAMPLE)
    assert [str(c).split(":")[0] for c in changes] == [
        "+ node ct-1", "+ node pacs", "+ destination main-pacs", "+ destination cloud",
        "+ rule ct-to-both", "+ rule everything-else",
    ]  # fmt: skip
    pacs = Destination.objects.get(name="main-pacs")
    assert pacs.kind == "dimse" and pacs.node == Node.objects.get(name="pacs") and pacs.max_concurrency == 4
    cloud = Destination.objects.get(name="cloud")
    assert cloud.token == "s3cret-token" and cloud.read_timeout == 300 and cloud.retry_attempts == 30
    rule = Rule.objects.get(name="ct-to-both")
    assert rule.stop and rule.order == 10 and rule.conditions["StudyDescription"] == "re:(?i)chest"
    assert sorted(rule.destinations.values_list("name", flat=True)) == ["cloud", "main-pacs"]
    assert Rule.objects.get(name="everything-else").is_default
    assert not any("s3cret" in str(change) for change in changes), "secrets never appear in the diff"


def test_export_masks_secrets_and_round_trips_keeping_them():
    import_config(EXAMPLE)
    exported = export_config()
    document = yaml.safe_load(exported)
    cloud = next(d for d in document["destinations"] if d["name"] == "cloud")
    assert cloud["token"] == SECRET_MASK and "s3cret" not in exported
    assert "node" not in cloud and "password" not in cloud, "blank fields are left out"
    assert next(r for r in document["rules"] if r["name"] == "everything-else")["default"] is True
    assert import_config(exported) == []
    assert Destination.objects.get(name="cloud").token == "s3cret-token"

    with_secrets = export_config(include_secrets=True)
    assert yaml.safe_load(with_secrets)["destinations"][0]["token"] == "s3cret-token"
    Rule.objects.all().delete()
    Destination.objects.all().delete()
    Node.objects.all().delete()
    import_config(with_secrets)
    assert export_config(include_secrets=True) == with_secrets


def test_changes_are_shown_as_a_diff_and_the_masked_secret_can_be_replaced():
    import_config(EXAMPLE)
    document = yaml.safe_load(export_config())
    document["destinations"][0]["token"] = "new-token"
    document["destinations"][1]["paused"] = True
    document["rules"] = [r for r in document["rules"] if r["name"] != "everything-else"]
    document["rules"][0]["destinations"] = ["cloud"]
    changes = [str(change) for change in import_config(yaml.safe_dump(document))]
    assert changes == [
        f"~ destination cloud: token: '{SECRET_MASK}' -> '{SECRET_MASK}'",
        "~ destination main-pacs: paused: False -> True",
        "~ rule ct-to-both: destinations: ['cloud', 'main-pacs'] -> ['cloud']",
        "- rule everything-else",
    ]
    assert Destination.objects.get(name="cloud").token == "new-token"
    assert list(Rule.objects.get(name="ct-to-both").destinations.values_list("name", flat=True)) == ["cloud"]


@pytest.mark.parametrize(
    ("replace", "by", "error"),
    [
        ("node: pacs", "node: nowhere", "destination 'main-pacs': field 'node': no node named 'nowhere'"),
        ("kind: dimse", "kind: carrier-pigeon", "destination 'main-pacs': field 'kind'"),
        ("    node: pacs\n", "", "destination 'main-pacs': field 'node': A DIMSE destination needs a node."),
        ("    url: https://cloud.example.org/dicomweb\n", "", "destination 'cloud': field 'url'"),
        ("token: s3cret-token", f"token: '{SECRET_MASK}'", "destination 'cloud': field 'token': \"********\" keeps"),
        ("max_concurrency: 4", "max_concurrency: 0", "destination 'main-pacs': field 'max_concurrency'"),
        ("max_concurrency: 4", "colour: red", "destination 'main-pacs': unknown field 'colour'"),
        ("[main-pacs, cloud]", "[main-pacs, attic]", "rule 'ct-to-both': field 'destinations': no destination named"),
        ("re:(?i)chest", "re:(unclosed", "rule 'ct-to-both': field 'conditions': StudyDescription: bad regular"),
        (
            "Modality: CT",
            "Modalty: CT",
            "rule 'ct-to-both': field 'conditions': Modalty: 'Modalty' is not a DICOM keyword",
        ),
        ("Modality: CT", "StudyDate: 'range:2026'", "rule 'ct-to-both': field 'conditions': StudyDate: bad range"),
        ("    conditions: {}\n", "", "rule 'everything-else': missing field 'conditions'"),
    ],
)
def test_bad_destination_or_rule_names_object_and_field_and_applies_nothing(replace, by, error):
    assert replace in EXAMPLE
    with pytest.raises(ConfigError) as caught:
        import_config(EXAMPLE.replace(replace, by, 1))
    assert any(error in message for message in caught.value.errors), caught.value.errors
    assert not Node.objects.exists() and not Destination.objects.exists() and not Rule.objects.exists()


def test_deleting_a_node_still_used_by_a_destination_is_an_error():
    import_config(EXAMPLE)
    with pytest.raises(ConfigError) as caught:
        import_config("nodes:\n  - {name: ct-1, ae_title: CT1, host: 10.1.2.3, port: 104}\n")
    assert caught.value.errors == ["node 'pacs': still used by destination 'main-pacs'; change or list that too"]
    with pytest.raises(ConfigError, match="destination 'cloud': still used by rule 'ct-to-both'"):
        import_config("destinations:\n  - {name: main-pacs, kind: dimse, node: pacs}\n")
    assert Node.objects.filter(name="pacs").exists() and Destination.objects.count() == 2


@pytest.mark.django_db(transaction=True)  # the commands run in their own process
def test_commands_dry_run_then_apply_and_export_secrets_only_when_asked(tmp_path):
    path = tmp_path / "isthmus.yaml"
    path.write_text(EXAMPLE)
    result = manage("import_config", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "dry run: 6 added, 0 changed, 0 removed; nothing applied"
    assert not Destination.objects.exists()
    assert manage("import_config", str(path)).returncode == 0
    assert Destination.objects.count() == 2 and Rule.objects.count() == 2
    assert "s3cret-token" not in manage("export_config").stdout
    assert "token: s3cret-token" in manage("export_config", "--include-secrets").stdout


def test_the_readme_example_imports_as_documented():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    example = next(block for block in blocks if "destinations:\n  - name:" in block)
    changes = import_config(example)
    assert len(changes) == 2 + 2 + 3
    cloud = Destination.objects.get(name="cloud")
    assert cloud.kind == "dicomweb" and cloud.auth == "oauth2" and cloud.oauth_client_secret
    assert Destination.objects.get(name="main-pacs").node.name == "pacs"
    chest = Rule.objects.get(name="chest-ct-to-cloud")
    assert sorted(chest.destinations.values_list("name", flat=True)) == ["cloud", "main-pacs"] and chest.stop
    assert Rule.objects.get(name="everything-else").is_default
    assert import_config(export_config()) == []
