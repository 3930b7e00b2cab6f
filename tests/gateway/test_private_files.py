"""Keys written once, for the gateway's user only, whichever of its processes comes first."""

from __future__ import annotations

import secrets
import stat
from concurrent.futures import ProcessPoolExecutor

from gateway.private_files import close_directory, read_or_create


def _read_or_create(path):
    return read_or_create(path, lambda: secrets.token_urlsafe(32))


def test_processes_racing_for_a_new_key_all_get_the_one_written(tmp_path):
    path = tmp_path / "secrets_key"
    with ProcessPoolExecutor(max_workers=6) as pool:
        keys = set(pool.map(_read_or_create, [path] * 24))
    assert keys == {path.read_text()} and len(path.read_text()) == 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["secrets_key"], "no temporary file left behind"


def test_an_open_directory_is_closed_and_said_so(tmp_path, capsys):
    tmp_path.chmod(0o755)
    close_directory(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    assert capsys.readouterr().err == f"isthmus: {tmp_path} was open to other users (mode 0755); now 0700\n"
    close_directory(tmp_path)
    assert capsys.readouterr().err == "", "a private directory is left alone, silently"
