"""Storage SOP Classes as SCP (C-STORE), PS3.4 Annex B: every instance goes through store.save().

pynetdicom writes each received data set straight to a file (chunked
receive), which we direct into the store's temp folder so that placing it is
one rename; the data set is never held in memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile

from django.conf import settings
from django.db import connection
from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt

from gateway import metrics, store
from gateway.dimse import guard
from gateway.dimse.handlers import allowed
from gateway.dimse.status import Status

log = logging.getLogger("isthmus.dimse")

# Accepted as proposed and kept as received, never transcoded (PS3.5 Section 10, Annex A).
# How often, in bytes written, a receive looks at the free space again.
SPACE_CHECK_BYTES = 4 * 1024 * 1024

TRANSFER_SYNTAXES = [
    *uid.UncompressedTransferSyntaxes,  # implicit/explicit little endian, deflated, big endian
    *uid.JPEGTransferSyntaxes,
    *uid.JPEGLSTransferSyntaxes,
    *uid.JPEG2000TransferSyntaxes,
    *uid.RLETransferSyntaxes,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    *uid.MPEGTransferSyntaxes,
]


class HashingFile:
    """pynetdicom's temp file for a C-STORE data set: hashed as it is written, and held to the store's limits.

    pynetdicom only ever appends to it (preamble, file meta, then each P-DATA
    fragment in order), so the running digest is the file's. It also sees every
    byte of the chunked receive, so it enforces ISTHMUS_MAX_INSTANCE_MB and the
    free-space watermark (ISTHMUS_MIN_FREE_MB: when created, then every
    SPACE_CHECK_BYTES). Past either it refuses rather than aborts: the file is
    removed at once and the rest of the data set is read and dropped, then the
    request is answered 0xA702 or 0xA700 (PS3.4 B.2.3, Refused: Out of
    Resources). The modality learns why and may go on with the association's
    other instances; an A-ABORT would say nothing, lose those too, and many
    modalities resend an aborted association at once. The cost is bandwidth,
    never memory or disk.
    """

    def __init__(self, file) -> None:
        self._file = file
        self.name, self.file = file.name, file.file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.refusal: tuple[int, str] | None = None  # (status, why) once refused
        self._next_space_check = 0

    def write(self, data: bytes) -> int:
        if self.refusal is None:
            self.size += len(data)
            if self.size > settings.MAX_INSTANCE_BYTES:
                limit = settings.MAX_INSTANCE_BYTES // 2**20
                self.refuse(Status.INSTANCE_TOO_LARGE, f"larger than {limit} MB (ISTHMUS_MAX_INSTANCE_MB)")
            elif self.size >= self._next_space_check:
                self._check_space()
        if self.refusal is not None:
            return len(data)  # dropped: the peer is still sending what we will refuse
        self.sha256.update(data)
        try:
            return self._file.write(data)
        except OSError as exc:  # ENOSPC, EIO: refused like the watermark
            self.refuse(Status.OUT_OF_RESOURCES, f"write failed: {exc.strerror or exc}")
            return len(data)

    def _check_space(self) -> None:
        self._next_space_check = self.size + SPACE_CHECK_BYTES
        try:
            stats = os.fstatvfs(self.file.fileno())
        except OSError:
            return
        free = stats.f_bavail * stats.f_frsize
        if free < settings.MIN_FREE_BYTES:
            self.refuse(Status.OUT_OF_RESOURCES, f"free space {free // 2**20} MB is below ISTHMUS_MIN_FREE_MB")

    def refuse(self, status: int, why: str) -> None:
        """Stop keeping the data set: remove the file now, drop what follows, answer `status` at the end."""
        self.refusal = (status, why)
        self.file = io.BytesIO()  # pynetdicom flushes .file after each fragment
        discard(self._file)

    def digest(self) -> tuple[str, int]:
        return self.sha256.hexdigest(), self.size

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _temp_file(*args, **kwargs) -> HashingFile:
    """pynetdicom's NamedTemporaryFile, in the store's temp folder (same filesystem as the root).

    Owned by the association receiving it, so discard_unclaimed() removes it if no handler ever takes it.
    """
    kwargs["dir"] = store.temp_dir()
    temp_file = HashingFile(tempfile.NamedTemporaryFile(*args, **kwargs))
    assoc = guard.current_association()
    if assoc is not None:
        assoc.__dict__.setdefault("isthmus_temp_files", []).append(temp_file)
    return temp_file


def add_contexts(ae: AE) -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _temp_file
    guard.at_association_end(discard_unclaimed)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)


def handle_store(event: evt.Event) -> int:
    """C-STORE: refuse a node without store permission, else hand the received file to the store."""
    written = getattr(event.request, "_dataset_file", None)
    refusal = written.refusal if isinstance(written, HashingFile) else None
    if not allowed(event, "store"):
        status = Status.REFUSED_NOT_AUTHORIZED  # PS3.7 C.5.4; pynetdicom removes its temp file
        metrics.STORE_FAILURES.labels(f"0x{status:04X}").inc()
        log.warning("C-STORE refused: %s may not store", event.assoc.requestor.ae_title)
    elif refusal is not None:
        status = refusal[0]
        metrics.STORE_FAILURES.labels(f"0x{status:04X}").inc()
        log.warning(
            "C-STORE of %s from %s refused (0x%04X) after %d bytes: %s",
            event.request.AffectedSOPInstanceUID,
            event.assoc.requestor.ae_title,
            status,
            written.size,
            refusal[1],
        )
    else:
        _keep_usable_connection()
        try:
            result = store.save(
                source=event.dataset_path,
                digest=written.digest() if isinstance(written, HashingFile) else None,
                calling_ae=event.assoc.requestor.ae_title,
                called_ae=event.assoc.acceptor.ae_title,
            )
            status = result.status
        except Exception:  # a bug must still answer, and not with pynetdicom's 0xC211
            log.exception("C-STORE of %s failed", event.request.AffectedSOPInstanceUID)
            status = Status.PROCESSING_FAILURE
    metrics.DIMSE_REQUESTS.labels("store", f"0x{status:04X}").inc()
    return status


def _keep_usable_connection() -> None:
    """Reuse the association's database connection from one C-STORE to the next, replacing it only if it broke.

    handlers.handle_association_end closes it when the association ends. Not
    close_old_connections(): with CONN_MAX_AGE 0 (the SQLite default) it closes
    the connection on every request, and closing and reopening a WAL database
    (a checkpoint, a new WAL) cost ~4 ms per instance (bench/store_bench.py).
    """
    if connection.connection is not None and not connection.is_usable():
        connection.close()


def discard_partial(event: evt.Event) -> None:
    """EVT_CONN_CLOSE (DUL thread): remove the file of a data set the connection cut short."""
    message = getattr(event.assoc.dimse, "message", None)
    discard(getattr(message, "_data_set_file", None))


def discard_queued(event: evt.Event) -> None:
    """EVT_ABORTED (association thread): remove the files of received requests no handler will see."""
    queue = event.assoc.dimse.msg_queue
    while not queue.empty():
        _context_id, primitive = queue.get_nowait()
        discard(getattr(primitive, "_dataset_file", None))


def discard_unclaimed(assoc) -> None:
    """When an association ends: remove every data set it received that no handler stored.

    pynetdicom drops some requests without a handler (on a context it did not
    accept, one that is not a valid request, one queued when the peer released)
    and leaves their files; a stored one was renamed away, so its removal fails quietly.
    """
    for temp_file in assoc.__dict__.pop("isthmus_temp_files", []):
        discard(temp_file)


def discard(temp_file) -> None:
    """Close and remove a received data set's temp file (idempotent)."""
    if temp_file is None:
        return
    try:
        temp_file.close()
        os.unlink(temp_file.name)
    except OSError:
        pass


HANDLERS = [
    (evt.EVT_C_STORE, handle_store),
    (evt.EVT_CONN_CLOSE, discard_partial),
    (evt.EVT_ABORTED, discard_queued),
]
