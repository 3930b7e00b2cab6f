"""STOW-RS a batch in one multipart/related request, streamed from the stored files, read per instance.

dicomweb-client's store_instances() takes decoded data sets and builds the
body in memory; a batch of large instances must not be, so the body here
streams the stored files (Content-Length known up front, paced by the rate
limit). dicomweb-client, on the same requests session and auth, does the
Verify action's QIDO-RS request.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from dicomweb_client.api import DICOMwebClient

from gateway.encryption import UndecryptableSecret
from routing.delivery import DEAD, DELIVERED, RETRY, DeliveryError, Item, Result, dicom_status_outcome
from routing.models import Destination
from routing.ratelimit import Pacer

CHUNK = 1 << 20
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Whole-request answers that no retry will change (PS3.18 10.5.3: 400 bad request, 409 every instance failed).
PERMANENT_HTTP = {400, 409, 413, 415}
_DELAY_SECONDS = re.compile(r"[0-9]{1,12}")  # RFC 9110 10.2.3: delay-seconds = 1*DIGIT


class MultipartBody:
    """A multipart/related body read from files part by part: iterable, with a length, never all in memory."""

    def __init__(self, items: list[Item], pacer: Pacer) -> None:
        self.boundary = uuid.uuid4().hex
        self.items, self.pacer = items, pacer
        self.heads = [
            f"--{self.boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {item.size}\r\n\r\n".encode()
            for item in items
        ]
        self.tail = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return sum(len(head) + item.size + 2 for head, item in zip(self.heads, self.items, strict=True)) + len(
            self.tail
        )

    def __iter__(self) -> Iterator[bytes]:
        for head, item in zip(self.heads, self.items, strict=True):
            self.pacer.wait(item.size)
            yield head
            sent = 0
            with open(item.path, "rb") as stream:
                while chunk := stream.read(CHUNK):
                    sent += len(chunk)
                    yield chunk
            if sent != item.size:  # the file changed under us: a wrong Content-Length would corrupt the body
                raise DeliveryError(f"stored file of {item.sop_instance_uid} changed size during the send")
            yield b"\r\n"
        yield self.tail


# --- Sessions and authentication --------------------------------------------------------------

_tokens: dict[tuple, tuple[str, float]] = {}  # (destination, token URL, client) -> (access token, expires at)
_tokens_lock = threading.Lock()


def session_for(destination: Destination, *, fresh_token: bool = False) -> requests.Session:
    """A requests session with the destination's auth, TLS verification and CA bundle."""
    for name in Destination.SECRETS:
        secret = getattr(destination, name)
        if isinstance(secret, UndecryptableSecret):  # retried: restoring the key lets the jobs go
            raise DeliveryError(f"the {name.replace('_', ' ')} of destination {destination.name} {secret.reason}")
    session = requests.Session()
    session.verify = destination.ca_bundle or destination.verify_tls
    session.headers["Accept-Encoding"] = "identity"
    if destination.auth == Destination.Auth.BASIC:
        session.auth = (destination.username, destination.password)
    elif destination.auth == Destination.Auth.BEARER:
        session.headers["Authorization"] = f"Bearer {destination.token}"
    elif destination.auth == Destination.Auth.OAUTH2:
        session.headers["Authorization"] = f"Bearer {oauth2_token(destination, session, fresh=fresh_token)}"
    return session


def oauth2_token(destination: Destination, session: requests.Session, *, fresh: bool = False) -> str:
    """OAuth2 client credentials grant (RFC 6749 4.4), cached per process until shortly before it expires."""
    key = (destination.pk, destination.oauth_token_url, destination.oauth_client_id, destination.oauth_scope)
    with _tokens_lock:
        cached = _tokens.get(key)
        if cached and not fresh and cached[1] > time.monotonic():
            return cached[0]
    data = {"grant_type": "client_credentials"}
    if destination.oauth_scope:
        data["scope"] = destination.oauth_scope
    try:
        answer = session.post(
            destination.oauth_token_url,
            data=data,
            auth=(destination.oauth_client_id, destination.oauth_client_secret),
            timeout=(destination.connect_timeout, destination.read_timeout),
        )
        answer.raise_for_status()
        grant = answer.json()
        token, lifetime = grant["access_token"], float(grant.get("expires_in", 300))
    except (requests.RequestException, ValueError, KeyError) as exc:
        raise DeliveryError(f"OAuth2 token request to {destination.oauth_token_url} failed: {exc}") from exc
    with _tokens_lock:
        _tokens[key] = (token, time.monotonic() + max(0.0, lifetime - 30))
    return token


# --- The batch ---------------------------------------------------------------------------------


def send_batch(destination: Destination, items: list[Item], report: Callable[[Result], None], pacer: Pacer) -> None:
    """POST every item in one STOW-RS request; report each instance's result from the response."""
    url = destination.url.rstrip("/") + "/studies"
    response = _post(destination, url, items, pacer)
    if response.status_code == 401 and destination.auth == Destination.Auth.OAUTH2:
        response = _post(destination, url, items, pacer, fresh_token=True)  # the token may have been revoked
    for result in results_from(response, items):
        report(result)


def _post(destination, url, items, pacer, *, fresh_token: bool = False) -> requests.Response:
    session = session_for(destination, fresh_token=fresh_token)
    body = MultipartBody(items, pacer)
    headers = {"Content-Type": body.content_type, "Accept": "application/dicom+json"}
    try:
        with session:
            return session.post(
                url, data=body, headers=headers, timeout=(destination.connect_timeout, destination.read_timeout)
            )
    except requests.RequestException as exc:
        raise DeliveryError(f"STOW-RS to {url}: {type(exc).__name__}: {exc}"[:1000]) from exc


def results_from(response: requests.Response, items: list[Item]) -> list[Result]:
    """Per-instance results from a STOW-RS response (PS3.18 10.5.3): the sequences first, the HTTP code for the rest."""
    code = response.status_code
    status = str(code)
    if code in TRANSIENT_HTTP:
        retry_after = _retry_after(response)
        asked = f", Retry-After {retry_after:.0f} s" if retry_after is not None else ""
        raise DeliveryError(f"STOW-RS answered HTTP {code}{asked}", status=status, retry_after=retry_after)
    referenced, failed = _sequences(response)
    if code >= 300 and not (referenced or failed):
        # Not the body: a server's error text may echo patient data, and this message is logged.
        raise DeliveryError(f"STOW-RS answered HTTP {code}", permanent=code in PERMANENT_HTTP, status=status)
    results = []
    for item in items:
        uid = item.sop_instance_uid
        if uid in failed:
            reason = failed[uid]
            outcome = dicom_status_outcome(reason) if reason is not None else DEAD
            reason_text = f"0x{reason:04X}" if reason is not None else "none given"
            results.append(Result(item.job_id, outcome, status, f"STOW-RS failure reason {reason_text}"))
        elif uid in referenced or (code < 300 and not failed and not referenced):
            results.append(Result(item.job_id, DELIVERED, status))  # 200 without a body: all stored
        else:
            outcome = DEAD if code in PERMANENT_HTTP else RETRY
            results.append(
                Result(item.job_id, outcome, status, f"not acknowledged in the STOW-RS response (HTTP {code})")
            )
    return results


def _sequences(response: requests.Response) -> tuple[set[str], dict[str, int | None]]:
    """SOP Instance UIDs in ReferencedSOPSequence, and FailedSOPSequence's with their FailureReason."""
    try:
        answer = response.json()
    except ValueError:
        return set(), {}
    if isinstance(answer, list):  # some servers wrap the data set in a list
        answer = answer[0] if answer else {}
    if not isinstance(answer, dict):
        return set(), {}
    referenced = {_uid(entry) for entry in _items(answer, REFERENCED_SOP_SEQUENCE)} - {""}
    failed = {}
    for entry in _items(answer, FAILED_SOP_SEQUENCE):
        reason = (entry.get(FAILURE_REASON) or {}).get("Value") or [None]
        failed[_uid(entry)] = int(reason[0]) if isinstance(reason[0], int | float) else None
    failed.pop("", None)
    return referenced, failed


def _items(answer: dict, tag: str) -> list[dict]:
    value = (answer.get(tag) or {}).get("Value") or []
    return [entry for entry in value if isinstance(entry, dict)]


def _uid(entry: dict) -> str:
    value = (entry.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [""]
    return str(value[0])


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After (RFC 9110 10.2.3), delay-seconds or an HTTP-date, as seconds from now; None when malformed.

    Not capped here: the job waits at most the destination's retry_max_delay (services._reschedule).
    """
    value = response.headers.get("Retry-After", "").strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --- Verify ----------------------------------------------------------------------------------


def verify(destination: Destination) -> tuple[bool, str]:
    """A QIDO-RS study search (limit 1) with the destination's auth: reachable, authorised, speaking DICOMweb."""
    started = time.perf_counter()
    try:
        session = session_for(destination)
        client = DICOMwebClient(
            url=destination.url.rstrip("/"),
            session=session,
            timeout=(destination.connect_timeout, destination.read_timeout),
        )
        client.set_http_retry_params(retry=False)
        client.search_for_studies(limit=1)
    except DeliveryError as exc:
        return False, str(exc)
    except requests.HTTPError as exc:
        return False, f"QIDO-RS answered HTTP {exc.response.status_code if exc.response is not None else '?'}"
    except (requests.RequestException, ValueError) as exc:
        return False, f"QIDO-RS failed: {type(exc).__name__}: {exc}"[:300]
    return True, f"QIDO-RS success in {(time.perf_counter() - started) * 1000:.1f} ms"
