"""Destination secrets at rest: encrypted in the database, plain where used, masked in exports, a clear error without the key."""

from __future__ import annotations

import stat
from collections.abc import Iterator

import pytest
import yaml
from cryptography.fernet import Fernet
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse

from gateway.config_file import SECRET_MASK, ConfigError, export_config, import_config
from gateway.encryption import KEY_FILE, PREFIX
from routing.models import Destination, ForwardJob
from tests.conftest import free_port, manage
from tests.routing.conftest import drain, rule, states, stow_destination
from tests.routing.operator_data import stow_destination_form
from tests.routing.stow_server import StowServer
from tests.routing.test_stow_failures import receive

SECRETS = {"password": "basic-s3cret", "token": "bearer-s3cret", "oauth_client_secret": "client-s3cret"}


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    server = StowServer(free_port()).start()
    yield server
    server.stop()


def stored(name: str) -> dict[str, str]:
    """The secret columns of a destination as the database holds them."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT password, token, oauth_client_secret FROM routing_destination WHERE name = %s", [name])
        return dict(zip(SECRETS, cursor.fetchone(), strict=True))


def test_secrets_are_encrypted_in_the_database_and_delivery_authenticates_with_them(
    settings, storage, rings, stow_server, tmp_path
):
    basic = stow_destination(stow_server.url, "basic", auth="basic", username="isthmus", password="basic-s3cret")
    bearer = stow_destination(stow_server.url, "bearer", auth="bearer", token="bearer-s3cret")
    rule("both", {}, basic, bearer)

    columns = {**stored("basic"), "token": stored("bearer")["token"]}
    assert columns["password"].startswith(PREFIX) and columns["token"].startswith(PREFIX)
    assert not any(secret in str(columns) for secret in SECRETS.values())
    key_file = settings.DATA_DIR / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, "the generated key is for the gateway's user only"
    assert Destination.objects.get(name="bearer").token == "bearer-s3cret", "the model reads the plain value"

    receive(tmp_path / "in", count=1)
    drain()

    assert states() == {"delivered": 2}
    assert sorted(request.authorization for request in stow_server.requests) == [
        "Basic aXN0aG11czpiYXNpYy1zM2NyZXQ=", "Bearer bearer-s3cret"
    ]  # fmt: skip


@pytest.mark.django_db(transaction=True)  # the commands run in their own process
def test_export_holds_no_secret_unless_asked_and_a_masked_import_keeps_them(tmp_path):
    stow_destination("https://cloud.example.org/dicomweb", "cloud", auth="oauth2", username="isthmus", **SECRETS)
    before = stored("cloud")

    masked = manage("export_config")
    assert masked.returncode == 0, masked.stderr
    assert not any(secret in masked.stdout for secret in SECRETS.values())
    cloud = yaml.safe_load(masked.stdout)["destinations"][0]
    assert [cloud[name] for name in SECRETS] == [SECRET_MASK] * 3

    path = tmp_path / "with-secrets.yaml"
    assert manage("export_config", str(path), "--include-secrets").returncode == 0
    assert {name: yaml.safe_load(path.read_text())["destinations"][0][name] for name in SECRETS} == SECRETS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "a file holding secrets is for its owner only"

    masked_file = tmp_path / "masked.yaml"
    masked_file.write_text(masked.stdout)
    imported = manage("import_config", str(masked_file))
    assert imported.returncode == 0 and "no changes" in imported.stdout, imported.stdout + imported.stderr
    assert stored("cloud") == before, "the stored secrets are untouched"
    assert {name: getattr(Destination.objects.get(name="cloud"), name) for name in SECRETS} == SECRETS


def test_with_another_key_secrets_are_a_clear_error_and_stay_stored(settings, storage, rings, stow_server, tmp_path):
    bearer = stow_destination(stow_server.url, "bearer", auth="bearer", token="bearer-s3cret")
    rule("to-bearer", {}, bearer)
    before = stored("bearer")
    settings.SECRETS_KEY = Fernet.generate_key().decode()  # ISTHMUS_SECRETS_KEY set to a key it was not saved with

    receive(tmp_path / "in", count=1)
    drain(timeout=1)

    job = ForwardJob.objects.get()
    assert job.state == "pending" and stow_server.requests == [], "nothing sent, the job waits for the key"
    assert "token of destination bearer cannot be decrypted with this key" in job.last_error
    with pytest.raises(ConfigError, match="destination 'bearer': field 'token' cannot be decrypted"):
        export_config(include_secrets=True)
    masked = export_config()
    assert import_config(masked) == [] and stored("bearer") == before

    settings.SECRETS_KEY = ""  # back to the key file it was saved with
    ForwardJob.objects.update(next_attempt_at=job.created_at)
    drain()
    assert states() == {"delivered": 1} and stow_server.requests[0].authorization == "Bearer bearer-s3cret"


def test_admin_says_a_secret_cannot_be_decrypted_and_saving_keeps_it(admin_client, settings, tmp_path):
    cloud = stow_destination("https://cloud.example.org/dicomweb", "cloud", auth="bearer", token="bearer-s3cret")
    before = stored("cloud")
    settings.DATA_DIR = tmp_path  # no key file here, and no ISTHMUS_SECRETS_KEY
    url = reverse("admin:routing_destination_change", args=[cloud.pk])

    page = admin_client.get(url).content.decode()

    assert "cannot be decrypted: no key" in page and PREFIX not in page
    form = stow_destination_form(cloud, max_concurrency=3, read_timeout=60)
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert stored("cloud")["token"] == before["token"] and Destination.objects.get().max_concurrency == 3


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_secrets_saved_in_clear_before_it_and_reverses():
    executor = MigrationExecutor(connection)
    encrypting = next(key for key in executor.loader.disk_migrations if key[1].endswith("_encrypted_secrets"))
    before = next(parent for parent in executor.loader.graph.node_map[encrypting].parents if parent.key[0] == "routing")
    latest = executor.loader.graph.leaf_nodes("routing")
    try:
        executor.migrate([before.key])
        old_apps = executor.loader.project_state([before.key]).apps
        old_apps.get_model("routing", "Destination").objects.create(
            name="legacy", kind="dicomweb", url="https://cloud.example.org/dicomweb", auth="basic", password="plain-pw",
            token="plain-token", retry_first_delay=1, retry_multiplier=2, retry_max_delay=1, retry_max_age=1,
            connect_timeout=1, read_timeout=1,
        )  # fmt: skip
        assert stored("legacy")["token"] == "plain-token"

        MigrationExecutor(connection).migrate([encrypting])
        assert stored("legacy")["token"].startswith(PREFIX) and stored("legacy")["password"].startswith(PREFIX)
        legacy = Destination.objects.get(name="legacy")
        assert (legacy.password, legacy.token, legacy.oauth_client_secret) == ("plain-pw", "plain-token", "")

        MigrationExecutor(connection).migrate([before.key])
        assert stored("legacy") == {"password": "plain-pw", "token": "plain-token", "oauth_client_secret": ""}
    finally:
        MigrationExecutor(connection).migrate(latest)
