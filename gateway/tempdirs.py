"""Per-process temp folders under <root>/.tmp, and the sweep of those whose process died.

Several processes (DIMSE listeners, web workers for STOW-RS, possibly on
several hosts sharing the volume) write temp files side by side, so a
start-up sweep must not delete another live process's half-received file.
Each process holds an flock on its folder's `.lock` for its lifetime; the
kernel drops it when the process dies, however it dies (SIGKILL included),
and the sweep removes exactly the folders whose lock it can take.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

TEMP_DIR = ".tmp"
LOCK = ".lock"
STAGING = ".new-"
# A folder still being set up (no lock yet) is left alone for this long.
STAGING_GRACE = 3600.0

_guard = threading.Lock()
_current: dict[tuple[int, Path], tuple[Path, int]] = {}  # (pid, root) -> (folder, lock fd)


def process_dir(root: Path) -> Path:
    """This process's temp folder under `root`, created and locked on first use (again after a fork)."""
    key = (os.getpid(), root)
    with _guard:
        known = _current.get(key)
        if known is not None and known[0].is_dir():
            return known[0]
        base = root / TEMP_DIR
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=base))
        fd = os.open(staging / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = base / f"{socket.gethostname()}-{os.getpid()}-{staging.name[len(STAGING) :]}"
        staging.rename(folder)  # named only once locked, so the sweep never sees it unlocked
        _current[key] = (folder, fd)
        return folder


def sweep(root: Path) -> int:
    """Remove the temp folders of dead processes; returns how many files went with them."""
    base = root / TEMP_DIR
    if not base.is_dir():
        return 0
    removed = 0
    for entry in base.iterdir():
        if entry.name.startswith(STAGING):
            if time.time() - entry.stat().st_mtime > STAGING_GRACE:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not entry.is_dir():
            removed += _remove_stale_file(entry)
            continue
        lock = _take_lock(entry)
        if lock is None:
            continue  # its process is alive
        try:
            removed += sum(1 for child in entry.iterdir() if child.name != LOCK)
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(lock)
    return removed


def _take_lock(folder: Path) -> int | None:
    """The folder's lock if its owner is gone, else None."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except FileNotFoundError:
        fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale_file(path: Path) -> int:
    """Files directly in .tmp are not ours by design; remove them only once clearly abandoned."""
    try:
        if time.time() - path.stat().st_mtime > STAGING_GRACE:
            path.unlink()
            return 1
    except OSError:
        pass
    return 0
