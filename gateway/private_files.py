"""Files only the gateway's own user may read: the database, keys, stored instances, logs under the data dir.

Every process sets its umask from the settings module, which all of them (manage.py, gunicorn's
workers, Celery) import before they write anything; a data directory left open by an earlier
version is closed at start-up, with a line saying so.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# New files 0600, new directories 0700: instances and the database hold patient data.
UMASK = 0o077


def restrict_umask() -> None:
    os.umask(UMASK)


def close_directory(path: Path) -> None:
    """Drop group and other access from a directory we own, saying so on stderr (settings load before logging)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(mode & 0o700)
            sys.stderr.write(f"isthmus: {path} was open to other users (mode {mode:04o}); now {mode & 0o700:04o}\n")
    except OSError as exc:  # not ours (a mount point): say so, the operator decides
        sys.stderr.write(f"isthmus: could not restrict {path} to its owner: {exc.strerror}\n")


def read_or_create(path: Path, generate: Callable[[], str]) -> str:
    """The key kept in `path`; the first process to need it writes it, 0600.

    Written to a temporary file and linked into place, so a concurrent reader sees no file or the
    whole key, and of two processes racing exactly one key wins.
    """
    if not path.exists():
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(generate())
                handle.flush()
                os.fsync(handle.fileno())
            _link_once(temp, path)
        finally:
            os.unlink(temp)
    return path.read_text().strip()


def _link_once(temp: str, path: Path) -> None:
    """Put the written key at `path` unless a key is there already."""
    try:
        os.link(temp, path)
    except FileExistsError:
        pass  # another process won the race: read its key
    except OSError:  # a filesystem without hard links: create exclusively, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(Path(temp).read_text())
