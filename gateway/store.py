"""The instance store: the one write path every received instance takes (C-STORE now, STOW-RS later).

Success is answered only once the file is durable and indexed:
temp file, fsync -> lock or insert the index row -> rename into
<root>/<study>/<series>/<sop>.dcm, fsync the directory -> commit. A crash at
any step leaves a temp file (swept at start-up) or a complete file no row
points at (overwritten by the resend), never a row without its file.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from pynetdicom.dsutils import split_dataset

from gateway import indexing, metrics, tempdirs
from gateway.dimse.status import Status
from gateway.models import Instance
from gateway.part10 import Bomb as DecodingBomb
from gateway.part10 import Header, Unreadable, read_header
from routing import outbox

log = logging.getLogger("isthmus.store")

CHUNK = 1 << 20
# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a
# component are invalid but sent by some devices; they are harmless in a path.
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")


class _SqliteWriter:
    """SQLite has one writer at a time: writers of every thread and process queue here, handed over at once.

    Without it they meet in SQLite's busy handler, which retries after sleeps of
    up to 100 ms: with 4 associations that wait was 40% of a C-STORE in one
    process, and with two listener processes (a process per core) four
    associations stored no faster than one (bench/store_bench.py). A thread lock
    orders this process's threads; flock() on a file beside the database orders
    the processes, opened once per process (a descriptor inherited across fork
    would share its lock).
    """

    def __init__(self) -> None:
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._pid != os.getpid():
                name = str(connection.settings_dict["NAME"])
                lock = f"{name}.writer-lock" if "memory" not in name else str(settings.DATA_DIR / "sqlite.writer-lock")
                self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_SQLITE_WRITER = _SqliteWriter()


@dataclass(frozen=True)
class StoreResult:
    """What save() did: a DICOM status (STOW-RS uses the same codes as failure reasons) and the outcome."""

    status: int
    outcome: str  # stored, duplicate, kept-first, replaced, rejected or failed
    sop_instance_uid: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


class Refused(Exception):
    """A refusal with its status, raised before anything reaches the store or the index."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Bomb(Refused):
    """A decoding bomb (part10.Bomb): save() answers 0xC000, save_many() raises it so the request is refused whole."""


@dataclass(frozen=True)
class Received:
    """One received file, checked and hashed, waiting in the temp dir."""

    temp: Path
    header: Header
    study_uid: str
    series_uid: str
    sop_uid: str
    sha256: str
    size: int
    calling_ae: str
    called_ae: str
    origin: str


def storage_root() -> Path:
    root = Path(settings.STORAGE_DIR)
    root.mkdir(parents=True, exist_ok=True)
    return root


def temp_dir() -> Path:
    """Where a receiver writes before save(): this process's folder on the root's filesystem."""
    return tempdirs.process_dir(storage_root())


def sweep_temp_files() -> int:
    """Remove temp files of processes that died mid-write; returns how many went."""
    removed = tempdirs.sweep(storage_root())
    if removed:
        log.info("swept %d orphaned temporary file(s) from %s", removed, storage_root() / tempdirs.TEMP_DIR)
    return removed


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and UID_RE.match(value) is not None


def relative_path(study_uid: str, series_uid: str, sop_uid: str, suffix: str = "") -> str:
    """<study>/<series>/<sop>[.suffix].dcm; only validated UIDs ever become path components."""
    for uid in (study_uid, series_uid, sop_uid):
        if not valid_uid(uid):
            raise ValueError(f"not a UID: {uid[:70]!r}")
    return f"{study_uid}/{series_uid}/{sop_uid}{suffix}.dcm"


@functools.lru_cache(maxsize=8)
def _resolved_root(root: str) -> Path:
    return Path(root).resolve()


def instance_path(instance: Instance) -> Path:
    """The file of an indexed instance (for WADO, C-MOVE, C-GET); never outside the root."""
    return stored_file(instance.path)


def stored_file(relative: str) -> Path:
    """A path from the index (Instance.path) made absolute; never outside the root.

    Checked lexically (no "..", not absolute), with no system call: WADO-RS and C-MOVE
    ask this for every instance they send. The store never makes symlinks.
    """
    root = _resolved_root(str(settings.STORAGE_DIR))
    path = Path(os.path.normpath(root / relative))
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"index path {relative!r} is outside the storage root")
    return path


def save(
    *,
    source: Path | BinaryIO,
    calling_ae: str = "",
    called_ae: str = "",
    origin: str = "dimse",
    expect_study_uid: str | None = None,
    digest: tuple[str, int] | None = None,
) -> StoreResult:
    """Store one Part 10 file and index it; success only once both are durable.

    `source` is a file inside temp_dir() (consumed: moved into the store or
    removed) or a readable stream (copied into temp_dir() first). `digest`
    is the sha256 and size of a source file whose writer hashed it as it
    wrote (the C-STORE receiver does), which saves reading it back.
    """
    temp: Path | None = None
    received: Received | None = None
    try:
        if isinstance(source, str | os.PathLike):
            temp = _in_temp_area(Path(source))
        _check_space()
        if temp is None:
            temp = _spool(source)
        received = _receive(
            temp,
            calling_ae=calling_ae,
            called_ae=called_ae,
            origin=origin,
            expect_study_uid=expect_study_uid,
            digest=digest,
        )
        result = _index_many([received])[0]
    except Refused as refusal:
        result = StoreResult(refusal.status, "failed", received.sop_uid if received else "", refusal.reason)
    except DatabaseError as exc:  # before or during the transaction: nothing was committed
        result = StoreResult(Status.INDEX_UNAVAILABLE, "failed", received.sop_uid if received else "", _why(exc))
    except OSError as exc:  # ENOSPC, EIO...: whatever was placed is removed by _index_many
        result = StoreResult(Status.OUT_OF_RESOURCES, "failed", received.sop_uid if received else "", _why(exc))
    finally:
        if temp is not None:
            _unlink(temp)  # already renamed away when stored
    _account(result, received, calling_ae)
    return result


@dataclass(frozen=True)
class Spooled:
    """A file a receiver wrote into temp_dir() for save_many(), with what it already knows of it."""

    path: Path
    digest: tuple[str, int] | None = None  # sha256 and size, when hashed while written
    synced: Future | None = None  # from sync_soon(), when its fsync was started as it was written


def sync_soon(path: Path) -> Future:
    """Start the fsync of a finished temp file in the background (save_many() waits for it).

    A receiver calls it as each file is complete, so the disk works while the next one arrives.
    The future's result is None, or the OSError the fsync met.
    """
    return _sync_pool().submit(_sync_file, path)


def save_many(
    sources: list[Spooled],
    *,
    calling_ae: str = "",
    called_ae: str = "",
    origin: str = "stow",
    expect_study_uid: str | None = None,
) -> list[StoreResult]:
    """Store several files as save() does, in one index transaction; a result per source, in order.

    For STOW-RS, whose answer comes once the whole request is stored: one turn
    at the writer lock, one fsync per directory and one commit serve every
    instance, and the files not yet durable are fsync'd all at once. Each
    instance is its own savepoint, so one refusal leaves the others stored.
    Every source file is consumed (moved into the store or removed). A decoding bomb
    in any source raises Bomb, with nothing stored: the request is hostile.
    """
    results: list[StoreResult | None] = [None] * len(sources)
    received: list[Received | None] = [None] * len(sources)
    context = {"calling_ae": calling_ae, "called_ae": called_ae, "origin": origin, "expect_study_uid": expect_study_uid}
    try:
        temps = [_in_temp_area(source.path) for source in sources]
        try:
            _check_space()
            received, results = _receive_all(temps, sources, context)
        except Bomb:
            raise
        except Refused as refusal:
            results = [StoreResult(refusal.status, "failed", "", refusal.reason)] * len(sources)
        waiting = [index for index, item in enumerate(received) if item is not None]
        if waiting:
            try:
                for index, result in zip(waiting, _index_many([received[i] for i in waiting]), strict=True):
                    results[index] = result
            except DatabaseError as exc:
                for index in waiting:
                    results[index] = StoreResult(Status.INDEX_UNAVAILABLE, "failed", received[index].sop_uid, _why(exc))
            except OSError as exc:
                for index in waiting:
                    results[index] = StoreResult(Status.OUT_OF_RESOURCES, "failed", received[index].sop_uid, _why(exc))
    finally:
        for source in sources:
            _unlink(source.path)  # already renamed away when stored
    for result, item in zip(results, received, strict=True):
        _account(result, item, calling_ae)
    return results


def _receive_all(
    temps: list[Path], sources: list[Spooled], context: dict
) -> tuple[list[Received | None], list[StoreResult | None]]:
    """Make every file durable (the fsyncs run together), then check each: (received, or its failure) per source."""
    synced = _sync_all([temp for temp, source in zip(temps, sources, strict=True) if source.synced is None])
    synced.update((temp, source.synced.result()) for temp, source in zip(temps, sources, strict=True) if source.synced)
    received: list[Received | None] = [None] * len(sources)
    results: list[StoreResult | None] = [None] * len(sources)
    for index, (temp, source) in enumerate(zip(temps, sources, strict=True)):
        try:
            if isinstance(synced.get(temp), OSError):
                raise synced[temp]
            received[index] = _receive(temp, digest=source.digest, synced=True, **context)
        except Bomb:
            raise
        except Refused as refusal:
            results[index] = StoreResult(refusal.status, "failed", "", refusal.reason)
        except OSError as exc:
            results[index] = StoreResult(Status.OUT_OF_RESOURCES, "failed", "", _why(exc))
    return received, results


def _sync_all(paths: list[Path]) -> dict[Path, OSError | None]:
    """fsync the files concurrently (the filesystem's journal commits them together); a failure per path."""
    if len(paths) < 2:
        return {path: _sync_file(path) for path in paths}
    return dict(zip(paths, _sync_pool().map(_sync_file, paths), strict=True))


def _sync_file(path: Path) -> OSError | None:
    """_fsync() for the pool: the error is returned, to be raised for its own instance only."""
    try:
        _fsync(path)
    except OSError as exc:
        return exc
    return None


_SYNC_POOL: ThreadPoolExecutor | None = None
_SYNC_POOL_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """This process's fsync threads, started on first use."""
    global _SYNC_POOL
    with _SYNC_POOL_LOCK:
        if _SYNC_POOL is None:
            _SYNC_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="isthmus-fsync")
        return _SYNC_POOL


def _forget_sync_pool() -> None:
    """In a forked child: the parent's pool has no threads behind it here, and its lock may be held."""
    global _SYNC_POOL, _SYNC_POOL_LOCK
    _SYNC_POOL, _SYNC_POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_sync_pool)


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or str(exc).splitlines()[0][:200]}"


def _check_space() -> None:
    free = shutil.disk_usage(storage_root()).free
    if free < settings.MIN_FREE_BYTES:
        raise Refused(Status.OUT_OF_RESOURCES, f"free space {free // 2**20} MB is below the watermark")


def _in_temp_area(path: Path) -> Path:
    """A caller's file must already be in the temp area, so that placing it is one atomic rename.

    Checked lexically against the area as configured and as resolved (no system call per file).
    """
    absolute = os.path.abspath(path)
    if not absolute.startswith(_temp_areas(str(settings.STORAGE_DIR))):
        raise ValueError(f"{path} is not in the store's temp area; pass a stream instead")
    return Path(absolute)


@functools.lru_cache(maxsize=8)
def _temp_areas(root: str) -> tuple[str, str]:
    """The temp area as configured and as resolved, each with a trailing separator (prefixes of its files)."""
    return str(Path(os.path.abspath(root)) / tempdirs.TEMP_DIR) + os.sep, str(
        _resolved_root(root) / tempdirs.TEMP_DIR
    ) + os.sep


def _spool(stream: BinaryIO) -> Path:
    """Copy a stream into a temp file of ours, chunk by chunk (never the whole data set in memory)."""
    with tempfile.NamedTemporaryFile(dir=temp_dir(), suffix=".dcm", delete=False) as spool:
        try:
            shutil.copyfileobj(stream, spool, CHUNK)
        except BaseException:
            spool.close()
            _unlink(Path(spool.name))
            raise
    return Path(spool.name)


def _receive(
    temp: Path,
    *,
    calling_ae: str,
    called_ae: str,
    origin: str,
    expect_study_uid: str | None = None,
    digest: tuple[str, int] | None = None,
    synced: bool = False,
) -> Received:
    """Check the file (whole, parseable, consistent UIDs), hash it and make it durable."""
    try:
        header = read_header(temp, indexing.HEADER_TAGS + outbox.tags(), scratch=temp_dir())
    except DecodingBomb as exc:
        uid = exc.sop_instance_uid if valid_uid(exc.sop_instance_uid) else "an instance"
        raise Bomb(Status.CANNOT_UNDERSTAND, f"{uid}: {exc}") from exc
    except Unreadable as exc:
        raise Refused(Status.CANNOT_UNDERSTAND, str(exc)) from exc
    dataset = header.dataset
    uids = {keyword: indexing.text(dataset, keyword, 65) for keyword in indexing.KEYWORDS if keyword.endswith("UID")}
    for keyword, value in uids.items():
        if not valid_uid(value):  # PS3.5 9.1; also what keeps "../" out of paths
            raise Refused(Status.CANNOT_UNDERSTAND, f"{keyword} is not a valid UID: {value[:70]!r}")
    # What the C-STORE command (or the STOW part's meta) announced must be what the data set is.
    if header.sop_class_uid and header.sop_class_uid != uids["SOPClassUID"]:
        raise Refused(Status.DATASET_MISMATCH, "SOP Class UID differs from the request's")
    if header.sop_instance_uid and header.sop_instance_uid != uids["SOPInstanceUID"]:
        raise Refused(Status.DATASET_MISMATCH, "SOP Instance UID differs from the request's")
    # STOW-RS to /studies/{study}: an instance of another study is refused before it is stored.
    if expect_study_uid is not None and uids["StudyInstanceUID"] != expect_study_uid:
        raise Refused(Status.DATASET_MISMATCH, "Study Instance UID differs from the request's")
    sha256, size = _digest_and_sync(temp, digest, synced)
    return Received(
        temp=temp,
        header=header,
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sha256=sha256,
        size=size,
        calling_ae=calling_ae.strip()[:16],
        called_ae=called_ae.strip()[:16],
        origin=origin,
    )


def _digest_and_sync(path: Path, known: tuple[str, int] | None = None, synced: bool = False) -> tuple[str, int]:
    """sha256 and size of the file, made durable (unless `synced` already); a `known` digest is trusted if the size agrees."""
    if known is not None and os.stat(path).st_size == known[1]:
        if not synced:
            _fsync(path)
        return known
    with open(path, "rb") as stream:
        digest, size = hashlib.sha256(), 0
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if not synced:
            os.fsync(stream.fileno())
    return digest.hexdigest(), size


def _index_many(batch: list[Received]) -> list[StoreResult]:
    """One transaction: lock or insert each row, place each file, fsync their directories, commit.

    Placed files go if it fails. Several instances are each in a savepoint
    (a refusal or index error fails that one only); a single one is not, so
    that its errors reach save() as they are.
    """
    placed: list[Path] = []
    directories: set[Path] = set()
    try:
        with _SQLITE_WRITER if connection.vendor == "sqlite" else nullcontext(), transaction.atomic():
            now = timezone.now()
            if len(batch) == 1:
                results = [_commit(batch[0], placed, now, directories)]
            else:
                results = [_commit_apart(received, placed, now, directories) for received in batch]
            for directory in directories:
                _fsync_dir(directory)
            return results
    except BaseException:
        for path in placed:
            _unlink(path)
        raise


def _commit_apart(received: Received, placed: list[Path], now, directories: set[Path]) -> StoreResult:
    """One instance of a batch in its own savepoint; what it placed is removed if it fails."""
    mine: list[Path] = []
    try:
        with transaction.atomic():
            result = _commit(received, mine, now, directories)
    except Refused as refusal:
        result = StoreResult(refusal.status, "failed", received.sop_uid, refusal.reason)
    except DatabaseError as exc:
        result = StoreResult(Status.INDEX_UNAVAILABLE, "failed", received.sop_uid, _why(exc))
    except OSError as exc:
        result = StoreResult(Status.OUT_OF_RESOURCES, "failed", received.sop_uid, _why(exc))
    if result.outcome == "failed":
        for path in mine:
            _unlink(path)
    else:
        placed.extend(mine)
    return result


def _commit(received: Received, placed: list[Path], now, directories: set[Path]) -> StoreResult:
    relative = relative_path(received.study_uid, received.series_uid, received.sop_uid)
    fields = _file_fields(received, relative, now)
    dataset = received.header.dataset
    instance = indexing.insert_under_series(
        dataset, series_uid=received.series_uid, sop_instance_uid=received.sop_uid, **fields
    )
    attempts = 0
    while instance is None:
        existing = indexing.lock_instance(received.sop_uid)
        if existing is not None:
            return _duplicate(received, existing, placed, now, directories)
        if attempts == 2:
            raise Refused(Status.PROCESSING_FAILURE, "the instance row could neither be inserted nor found")
        # A new series (or a row deleted since): the general path, which may lose a race
        # with a concurrent association storing the same UID and then finds a duplicate.
        instance = indexing.create_instance(
            dataset, series=_series(received, now), sop_instance_uid=received.sop_uid, **fields
        )
        attempts += 1
    outbox.write_jobs(instance, received)
    _place(received.temp, relative, placed, directories)
    return StoreResult(Status.SUCCESS, "stored", received.sop_uid)


def _duplicate(received: Received, existing: Instance, placed: list[Path], now, directories: set[Path]) -> StoreResult:
    """Same SOP Instance UID again: identical bytes change nothing; different ones follow the policy."""
    stored = instance_path(existing)
    missing = not stored.is_file()
    if not missing and (existing.sha256 == received.sha256 or _same_dataset(stored, received)):
        return StoreResult(Status.SUCCESS, "duplicate", received.sop_uid)
    policy = "replace" if missing else settings.DUPLICATE_POLICY  # a lost file is repaired, whatever the policy
    detail = (
        f"policy {policy}{' (stored file missing)' if missing else ''}; "
        f"stored sha256 {existing.sha256} {existing.transfer_syntax_uid}; "
        f"received sha256 {received.sha256} {received.header.transfer_syntax_uid}; "
        f"study {received.study_uid} series {received.series_uid}"
    )
    action = {"keep-first": "kept-first", "reject": "rejected", "replace": "replaced"}[policy]
    indexing.record_duplicate(
        action=f"store.duplicate.{action}",
        actor=received.calling_ae,
        sop_instance_uid=received.sop_uid,
        detail=detail,
        at=now,
    )
    if policy == "keep-first":
        return StoreResult(Status.SUCCESS, action, received.sop_uid, "duplicate with different content, kept the first")
    if policy == "reject":
        return StoreResult(Status.DUPLICATE_SOP_INSTANCE, action, received.sop_uid, "duplicate with different content")
    # A new name beside the old file: until the commit, the row still points at intact bytes.
    relative = relative_path(received.study_uid, received.series_uid, received.sop_uid)
    if relative == existing.path and not missing:
        relative = relative_path(received.study_uid, received.series_uid, received.sop_uid, f".{received.sha256[:16]}")
    indexing.replace_instance(
        existing, received.header.dataset, series=_series(received, now), **_file_fields(received, relative, now)
    )
    outbox.write_jobs(existing, received)  # the new bytes are owed to the destinations too
    _place(received.temp, relative, placed, directories)
    if not missing:
        transaction.on_commit(lambda: _unlink(stored))
    return StoreResult(Status.SUCCESS, action, received.sop_uid, "duplicate with different content, replaced")


def _series(received: Received, now):
    return indexing.series_for(
        received.header.dataset,
        study_uid=received.study_uid,
        series_uid=received.series_uid,
        calling_ae=received.calling_ae,
        received_at=now,
    )


def _file_fields(received: Received, relative: str, now) -> dict:
    return {
        "path": relative,
        "size": received.size,
        "sha256": received.sha256,
        "transfer_syntax_uid": received.header.transfer_syntax_uid,
        "calling_ae": received.calling_ae,
        "called_ae": received.called_ae,
        "source": received.origin,
        "received_at": now,
    }


def _same_dataset(stored: Path, received: Received) -> bool:
    """Byte-compare the data sets, ignoring the file meta (which another receiver may write differently)."""
    _meta, stored_offset = split_dataset(stored)
    if stored.stat().st_size - stored_offset != received.size - received.header.dataset_offset:
        return False
    with open(stored, "rb") as old, open(received.temp, "rb") as new:
        old.seek(stored_offset)
        new.seek(received.header.dataset_offset)
        while True:
            old_chunk, new_chunk = old.read(CHUNK), new.read(CHUNK)
            if old_chunk != new_chunk:
                return False
            if not old_chunk:
                return True


def _place(temp: Path, relative: str, placed: list[Path], directories: set[Path]) -> None:
    """Rename the durable temp file into place; its directory joins those fsync'd before the commit."""
    final = storage_root() / relative
    _make_dirs(final.parent)
    os.rename(temp, final)  # atomic: the temp dir is on the root's filesystem
    placed.append(final)
    directories.add(final.parent)


def _make_dirs(directory: Path) -> None:
    """mkdir -p, fsyncing each parent that gained an entry, so the new directories survive a crash."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            continue  # a concurrent association made it
        _fsync_dir(created.parent)


def _fsync_dir(directory: Path) -> None:
    _fsync(directory, os.O_DIRECTORY)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)


def _account(result: StoreResult, received: Received | None, calling_ae: str) -> None:
    """One metric and one log line per instance; UIDs and AE titles only, never patient data."""
    if result.outcome in ("stored", "replaced") and received is not None:
        metrics.STORED_BYTES.inc(received.size)
    if result.ok:
        metrics.STORED_INSTANCES.labels(result.outcome).inc()
        level = logging.DEBUG if result.outcome in ("stored", "duplicate") else logging.INFO
        log.log(level, "%s %s from %s (%s)", result.outcome, result.sop_instance_uid, calling_ae, result.reason or "ok")
        return
    metrics.STORE_FAILURES.labels(f"0x{result.status:04X}").inc()
    log.warning(
        "refused %s from %s: 0x%04X %s",
        result.sop_instance_uid or "an instance",
        calling_ae,
        result.status,
        result.reason,
    )
