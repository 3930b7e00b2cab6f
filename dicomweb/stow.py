"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related through the same path as C-STORE.

The body is spooled part by part into the store's temp area (never held in
memory) and checked whole before anything is stored: a malformed or oversized
body stores nothing. The parts then go through gateway.store.save_many(), so
durability, the duplicate policy and routing jobs are those of C-STORE.

Answers (PS3.18 10.5.3): 200 all stored; 202 some failed; 409 none stored;
400 malformed body, or a decoding bomb in any part (nothing stored); 411 no length; 413 too large or too many parts; 415 not
multipart/related with type application/dicom; 503 temp area not writable. An instance of another study
than the one in the URL fails with 0xA900, the code store.save() gives any data
set that differs from what its request announced (Orthanc answers 0x0110).
"""

from __future__ import annotations

import json
import logging
import struct
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO

from django.conf import settings
from django.http import HttpResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from dicomweb.auth import WriteScope
from dicomweb.base import DICOM_JSON, DicomWebView, add_warnings, problem
from dicomweb.multipart_reader import BadBody, Part, TooLarge, media_type, spool_parts
from gateway import store
from gateway.dimse.status import Status
from gateway.models import Instance
from gateway.part10 import LONG_VRS

log = logging.getLogger("isthmus.dicomweb.stow")

DICOM = "application/dicom"


class StowRefused(Exception):
    """The request as a whole is refused with an HTTP status (nothing was stored)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class StowAnswer:
    """What the store made of the parts; `dicom_json()` is the PS3.18 10.5.3 response (DICOM JSON, PS3.18 F.2)."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (SOP class, SOP instance, reason)
    warnings: list[str] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def dicom_json(self, studies_url: str, target_study: str | None) -> dict:
        """One index query for the whole request gives each stored instance its RetrieveURL."""
        rows = Instance.objects.filter(sop_instance_uid__in=[sop for _class, sop in self.stored]).values_list(
            "sop_instance_uid", "series__series_instance_uid", "series__study__study_instance_uid"
        )
        places = {sop: (study, series) for sop, series, study in rows}
        answer: dict = {}
        studies = {target_study} if target_study else {study for study, _series in places.values()}
        if len(studies) == 1:
            answer["00081190"] = _value("UR", f"{studies_url}/{next(iter(studies))}")  # RetrieveURL
        if self.failed:
            answer["00081198"] = _sequence(  # FailedSOPSequence
                [_item(sop_class, sop, **{"00081197": _value("US", reason)}) for sop_class, sop, reason in self.failed]
            )
        if self.stored:
            answer["00081199"] = _sequence(  # ReferencedSOPSequence
                [
                    _item(sop_class, sop, **{"00081190": _value("UR", _instance_url(studies_url, sop, places))})
                    for sop_class, sop in self.stored
                ]
            )
        return answer


def _value(vr: str, value: str | int) -> dict:
    return {"vr": vr, "Value": [value]} if value != "" else {"vr": vr}


def _sequence(items: list[dict]) -> dict:
    return {"vr": "SQ", "Value": items}


def _item(sop_class: str, sop: str, **extra: dict) -> dict:
    """ReferencedSOPClassUID and ReferencedSOPInstanceUID (empty when the part gave no valid UID), then `extra`."""
    return {
        "00081150": _value("UI", sop_class if store.valid_uid(sop_class) else ""),
        "00081155": _value("UI", sop if store.valid_uid(sop) else ""),
        **extra,
    }


def _instance_url(studies_url: str, sop: str, places: dict[str, tuple[str, str]]) -> str:
    study, series = places.get(sop, ("", ""))
    return f"{studies_url}/{study}/series/{series}/instances/{sop}" if study else ""


def read_body(stream: BinaryIO, content_type: str, *, length: int | None, max_bytes: int, max_parts: int) -> list[Part]:
    """Check the media type and caps, then spool the parts; raises StowRefused with the HTTP status."""
    mime, params = media_type(content_type)
    if length is not None and length > max_bytes:
        raise StowRefused(413, f"body of {length} bytes is larger than ISTHMUS_STOW_MAX_BYTES ({max_bytes})")
    try:
        if mime == DICOM:  # a bare single instance, as some clients send
            boundary = uuid.uuid4().hex
            framed = _SinglePart(stream, boundary)
            return spool_parts(
                framed,
                boundary,
                directory=store.temp_dir(),
                max_bytes=max_bytes + 128,
                max_parts=1,
                sync=store.sync_soon,
            )
        if mime != "multipart/related":
            raise StowRefused(415, f"expected multipart/related; type={DICOM}, not {mime or 'nothing'}")
        if params.get("type", DICOM).lower() != DICOM:
            raise StowRefused(415, f"only type={DICOM} parts are accepted, not {params['type']}")
        if not params.get("boundary"):
            raise StowRefused(400, "the multipart/related content type has no boundary")
        return spool_parts(
            stream,
            params["boundary"],
            directory=store.temp_dir(),
            max_bytes=max_bytes,
            max_parts=max_parts,
            sync=store.sync_soon,
        )
    except BadBody as exc:
        raise StowRefused(400, str(exc)) from exc
    except TooLarge as exc:
        raise StowRefused(413, f"{exc} (ISTHMUS_STOW_MAX_BYTES / ISTHMUS_STOW_MAX_PARTS)") from exc
    except OSError as exc:  # ENOSPC, EIO... writing the temp files: ours, and transient
        raise StowRefused(503, f"the store's temp area cannot be written: {exc.strerror or exc}") from exc


class _SinglePart:
    """Frames a bare application/dicom body as one multipart part, so both kinds share one reader."""

    def __init__(self, stream: BinaryIO, boundary: str) -> None:
        self.pieces = [f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode()]
        self.closing = f"\r\n--{boundary}--\r\n".encode()
        self.stream, self.done = stream, False

    def read(self, size: int) -> bytes:
        if self.pieces:
            return self.pieces.pop(0)
        if self.done:
            return b""
        chunk = self.stream.read(size)
        if not chunk:
            self.done = True
            return self.closing
        return chunk


def store_parts(parts: list[Part], *, calling_ae: str, study_uid: str | None) -> StowAnswer:
    """Store the spooled parts with store.save_many() (one index transaction); every temp file is consumed.

    Raises StowRefused (400) when a part is a decoding bomb: then nothing is stored.
    """
    answer = StowAnswer()
    dicom: list[tuple[Part, str, str]] = []
    try:
        for part in parts:
            sop_class, sop_instance = announced_uids(part.head)
            if part.content_type in ("", DICOM):
                dicom.append((part, sop_class, sop_instance))
                continue
            answer.failed.append((sop_class, sop_instance, Status.CANNOT_UNDERSTAND))
            log.warning("STOW-RS part of type %s refused from %s", part.content_type[:60], calling_ae)
        sources = [store.Spooled(part.path, part.digest, part.synced) for part, _class, _sop in dicom]
        results = store.save_many(sources, calling_ae=calling_ae, origin="stow", expect_study_uid=study_uid)
    except store.Bomb as bomb:  # a hostile request: refused whole, nothing stored
        raise StowRefused(400, f"decoding bomb: {bomb.reason}") from bomb
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)  # stored ones were renamed away
    for (_part, sop_class, sop_instance), result in zip(dicom, results, strict=True):
        if not result.ok:
            answer.failed.append((sop_class, result.sop_instance_uid or sop_instance, result.status))
            answer.warnings.append(f"{result.sop_instance_uid or 'an instance'}: 0x{result.status:04X} {result.reason}")
            continue
        if result.outcome == "kept-first":
            answer.warnings.append(f"{result.sop_instance_uid}: {result.reason}")
        answer.stored.append((sop_class, result.sop_instance_uid))
    return answer


def announced_uids(head: bytes) -> tuple[str, str]:
    """Media Storage SOP Class and Instance UIDs from a part's file meta (PS3.10 7.1), to name it if it fails.

    Read by hand from the part's first bytes: the group 2 elements are explicit VR little endian. Empty if unreadable.
    """
    if head[128:132] != b"DICM":
        return "", ""
    found, position = {}, 132
    while position + 12 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            break
        if head[position + 4 : position + 6] in LONG_VRS:
            (length,), start = struct.unpack_from("<I", head, position + 8), position + 12
        else:
            (length,), start = struct.unpack_from("<H", head, position + 6), position + 8
        found[element] = head[start : start + length]
        position = start + length
    return tuple(found.get(element, b"").decode("ascii", "replace").strip("\0 ")[:64] for element in (2, 3))


def _body_stream(request) -> tuple[BinaryIO, int | None]:
    """The raw body and its declared length; chunked bodies only where the server decodes them (gunicorn)."""
    django_request = request._request  # DRF's documented way to the HttpRequest; .body would load it all
    raw_length = request.META.get("CONTENT_LENGTH") or ""
    if raw_length.strip():
        try:
            return django_request, int(raw_length)
        except ValueError as exc:
            raise StowRefused(400, "Content-Length is not a number") from exc
    if request.META.get("wsgi.input_terminated"):
        return request.META["wsgi.input"], None
    raise StowRefused(411, "send Content-Length (this server does not decode chunked bodies)")


def caller_name(request) -> str:
    """Who stored: the token's name (recorded as the calling AE, cut to 16)."""
    token = getattr(request.user, "token", None)
    name = getattr(token, "name", None) or getattr(request.user, "username", "") or "STOW"
    return name[:16]


class StowView(DicomWebView):
    """POST /dicomweb/studies[/{study}]."""

    permission_classes = [WriteScope]

    def post(self, request, study: str | None = None) -> HttpResponse:
        if study is not None and not store.valid_uid(study):
            return problem(400, "the study in the URL is not a valid UID")
        try:
            stream, length = _body_stream(request)
            parts = read_body(
                stream,
                request.META.get("CONTENT_TYPE", ""),
                length=length,
                max_bytes=settings.STOW_MAX_BYTES,
                max_parts=settings.STOW_MAX_PARTS,
            )
            answer = store_parts(parts, calling_ae=caller_name(request), study_uid=study)
        except StowRefused as refusal:  # problem() writes the one log line
            return problem(refusal.status, f"STOW-RS from {caller_name(request)}: {refusal.detail}")
        studies_url = request.build_absolute_uri(reverse("qido-studies"))
        body = json.dumps(answer.dicom_json(studies_url, study))
        # The bare media type: dicomweb-client compares Content-Type as a whole string.
        response = HttpResponse(body, status=answer.http_status, content_type=DICOM_JSON)
        log.info("STOW-RS from %s: %d stored, %d failed", caller_name(request), len(answer.stored), len(answer.failed))
        return add_warnings(response, answer.warnings[:20])


def with_stow(view):
    """POST /studies[/{study}] is STOW-RS; other methods go to `view` (QIDO-RS search, WADO-RS retrieve).

    Django routes by path alone, and these paths are shared with QIDO-RS and WADO-RS.
    """
    stow = StowView.as_view()

    @csrf_exempt  # DRF checks CSRF itself for session-authenticated requests
    def dispatch(request, *args, **kwargs):
        return (stow if request.method == "POST" else view)(request, *args, **kwargs)

    return dispatch
