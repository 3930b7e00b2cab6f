"""Bad environment values stop start-up with one line per variable, naming it."""

from __future__ import annotations

import pytest

from gateway.env import Env
from tests.conftest import manage, peer_env


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "ISTHMUS_DIMSE_PORT",
            "eleven",
            "isthmus: invalid ISTHMUS_DIMSE_PORT='eleven': expected an integer from 1 to 65535",
        ),
        (
            "ISTHMUS_HTTP_PORT",
            "70000",
            "isthmus: invalid ISTHMUS_HTTP_PORT='70000': expected an integer from 1 to 65535",
        ),
        ("ISTHMUS_AE_TITLE", "MUCH_TOO_LONG_AE_TITLE", "isthmus: invalid ISTHMUS_AE_TITLE='MUCH_TOO_LONG_AE_TITLE'"),
        (
            "ISTHMUS_REQUIRE_KNOWN_AE",
            "perhaps",
            "isthmus: invalid ISTHMUS_REQUIRE_KNOWN_AE='perhaps': expected true or false",
        ),
        ("DATABASE_URL", "oracle://x", "isthmus: invalid DATABASE_URL='oracle://x'"),
        ("CELERY_BROKER_URL", "kafka://x", "isthmus: invalid CELERY_BROKER_URL='kafka://x'"),
        ("ISTHMUS_DATA_DIR", "/proc/isthmus", "isthmus: invalid ISTHMUS_DATA_DIR='/proc/isthmus'"),
        # A secret is never echoed, not even a wrong one.
        (
            "ISTHMUS_SECRETS_KEY",
            "not-a-fernet-key",
            "isthmus: invalid ISTHMUS_SECRETS_KEY='(hidden)': expected a Fernet",
        ),
    ],
)
def test_invalid_value_stops_start_up_naming_the_variable(name, value, expected):
    result = manage("check", env=peer_env(**{name: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_every_bad_variable_is_reported_at_once():
    env = Env({"ISTHMUS_DIMSE_PORT": "0", "ISTHMUS_REQUIRE_KNOWN_AE": "maybe", "ISTHMUS_HL7_PORT": "2575"})
    assert env.port("ISTHMUS_DIMSE_PORT", 11112) == 11112
    assert env.bool("ISTHMUS_REQUIRE_KNOWN_AE", True) is True
    assert env.port("ISTHMUS_HL7_PORT", 1) == 2575
    assert [e.split("=")[0] for e in env.errors] == ["invalid ISTHMUS_DIMSE_PORT", "invalid ISTHMUS_REQUIRE_KNOWN_AE"]


def test_defaults_need_no_variables():
    env = Env({})
    assert (env.ae_title("ISTHMUS_AE_TITLE", "ISTHMUS"), env.port("ISTHMUS_DIMSE_PORT", 11112)) == ("ISTHMUS", 11112)
    assert env.bool("ISTHMUS_REQUIRE_KNOWN_AE", True) is True and env.errors == []


PRAGMA = "from django.db import connection; print(connection.cursor().execute('PRAGMA synchronous').fetchone()[0])"


@pytest.mark.parametrize(("value", "expected"), [(None, "2"), ("normal", "1"), ("off", None)])
def test_sqlite_commits_are_synced_to_disk_unless_told_otherwise(tmp_path, value, expected):
    """synchronous=FULL (2) by default: an acknowledged commit survives a power cut; NORMAL (1) on request."""
    env = {key: text for key, text in peer_env(ISTHMUS_DATA_DIR=str(tmp_path)).items() if key != "DATABASE_URL"}
    if value:
        env["ISTHMUS_SQLITE_SYNCHRONOUS"] = value
    result = manage("shell", "-c", PRAGMA, env=env)
    if expected is None:
        assert result.returncode == 2
        assert "invalid ISTHMUS_SQLITE_SYNCHRONOUS='off': expected one of full, normal" in result.stderr
    else:
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr  # after the shell's banner
