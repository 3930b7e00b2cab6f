"""One HL7 message in, one ACK out: admit, read, map, apply in a transaction, answer after the commit.

AA once the change is committed; AE (with ERR) for a message understood but
not applicable; AR for one that cannot be read, is of a type we do not
handle, comes from a source that may not send it or too often, or cannot be
applied now because the database is unavailable (HL7 v2.5 2.9.2, original
acknowledgment mode: AR asks the sender to retry later, AE says the message
is wrong). A repeated control ID (MSH-10) of an applied message gets its
stored ACK again and changes nothing. Logs carry peer address, message type,
control ID and accession numbers only.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

from gateway import hl7_senders, ratelimit
from gateway.logthrottle import Throttled
from worklist import services
from worklist.errors import INTERNAL_ERROR, RECORD_LOCKED, UNSUPPORTED_MESSAGE_TYPE, Rejected, WorklistError
from worklist.hl7 import ack, mapping, metrics

log = logging.getLogger("isthmus.hl7")
# Refusals from one source for one reason: one line per 10 s, however many messages; the metric counts each.
throttled_log = Throttled(log)
RATE_KIND = "hl7"
# The database cannot be reached or is locked: nothing is wrong with the message, the sender retries.
UNAVAILABLE = (OperationalError, InterfaceError)


def handle_message(raw: bytes, peer: str = "") -> bytes:
    """The MLLP server's handler: the ACK bytes for one message from peer "ip:port" (never raises)."""
    header = mapping.lenient_header(raw)
    try:
        close_old_connections()
        refusal = _admit(header, hl7_senders.peer_ip(peer))
        return refusal if refusal is not None else _apply(raw, peer)
    except UNAVAILABLE as exc:
        log.error("HL7 %s control=%s not applied, database unavailable (%s): AR, the sender retries",
                  header.message_type or "(unknown)", header.control_id or "-", _cause(exc))  # fmt: skip
        metrics.MESSAGES.labels("AR", "database-unavailable").inc()
        answer = ack.build(header, "AR", error_text="database unavailable: retry later", error_code=RECORD_LOCKED)
        return ack.encode(answer, header.encoding)
    except Exception as exc:  # a bug before the message was read: refuse it, say so, keep the connection
        log.error("HL7 %s control=%s not admitted: %s", header.message_type or "(unknown)", header.control_id or "-",
                  type(exc).__name__)  # fmt: skip
        log.debug("HL7 admission failure detail", exc_info=True)
        metrics.MESSAGES.labels("AR", "internal-error").inc()
        return ack.encode(ack.build(header, "AR", error_text="internal error", error_code=INTERNAL_ERROR),
                          header.encoding)  # fmt: skip


def _cause(exc: Exception) -> str:
    """The error's class and first line: the driver's reason (refused, locked), not the query's values."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _admit(header: mapping.Header, address: str) -> bytes | None:
    """AR for a source over its rate, or a sender not allowed this message; None lets the message in."""
    limit, window = settings.HL7_RATE_LIMIT, settings.HL7_RATE_WINDOW
    if not ratelimit.hit(RATE_KIND, address, limit=limit, window=window):
        text = f"more than {limit} messages in {window:g} s from {address}: retry later"
        return _refuse(header, address, "rate-limited", text, INTERNAL_ERROR)
    verdict = hl7_senders.decide(address=address, message_type=header.message_type)
    if not verdict.accepted:
        hl7_senders.record_refusal(verdict=verdict, address=address, message_type=header.message_type,
                                   control_id=header.control_id)  # fmt: skip
        code = UNSUPPORTED_MESSAGE_TYPE if verdict.reason == hl7_senders.Reason.TYPE_NOT_ALLOWED else INTERNAL_ERROR
        return _refuse(header, address, verdict.reason, verdict.text, code)
    if verdict.sender is not None:
        hl7_senders.mark_seen(sender=verdict.sender, address=address)
    return None


def _refuse(header: mapping.Header, address: str, reason: str, text: str, error_code: str) -> bytes:
    """Nothing read past MSH, nothing kept but the count: the message may be anyone's."""
    throttled_log.warning((address, reason), "HL7 %s control=%s from %s refused (%s): AR",
                          header.message_type or "(unknown)", header.control_id or "-", address, reason)  # fmt: skip
    metrics.MESSAGES.labels("AR", reason).inc()
    return ack.encode(ack.build(header, "AR", error_text=text, error_code=error_code), header.encoding)


def _apply(raw: bytes, peer: str) -> bytes:
    try:
        parsed = mapping.read(raw)
    except Rejected as exc:
        return _answer_failure(mapping.lenient_header(raw), raw.decode("latin-1"), "AR", exc.text, exc.code, "", peer)
    header = parsed.header
    try:
        replay = services.stored_ack(header=header)
        if replay is not None:
            log.info("HL7 %s control=%s repeated: stored ACK sent again", header.message_type, header.control_id)
            metrics.MESSAGES.labels(replay.ack_code, "repeated").inc()
            return ack.encode(replay.ack, header.encoding)
        content = mapping.content_of(parsed)
        aa = ack.build(header, "AA")
        row, applied, orders = services.apply_hl7(
            header=header, content=content, raw=parsed.text, ack=aa, peer_address=peer
        )
    except Rejected as exc:
        return _answer_failure(header, parsed.text, "AR", exc.text, exc.code, "", peer)
    except WorklistError as exc:
        return _answer_failure(header, parsed.text, "AE", exc.text, exc.code, exc.location, peer)
    except UNAVAILABLE:
        raise  # handle_message answers AR
    except Exception as exc:  # a bug: say so, do not crash the connection
        log.error("HL7 %s control=%s failed: %s", header.message_type, header.control_id, type(exc).__name__)
        log.debug("HL7 failure detail", exc_info=True)
        metrics.MESSAGES.labels("AE", "internal-error").inc()
        return ack.encode(ack.build(header, "AE", error_text="internal error", error_code=INTERNAL_ERROR),
                          header.encoding)  # fmt: skip
    accessions = ",".join(order.accession_number for order in orders)
    if applied:
        log.info("HL7 %s control=%s applied: AA%s", header.message_type, header.control_id,
                 f" accession={accessions}" if accessions else "")  # fmt: skip
    else:
        log.info("HL7 %s control=%s repeated: stored ACK sent again", header.message_type, header.control_id)
    metrics.MESSAGES.labels("AA", "applied" if applied else "repeated").inc()
    return ack.encode(row.ack, header.encoding)


def _answer_failure(
    header: mapping.Header, raw: str, code: str, text: str, error_code: str, location: str, peer: str
) -> bytes:
    answer = ack.build(header, code, error_text=text, error_code=error_code, error_location=location)
    log.warning("HL7 %s control=%s answered %s: %s", header.message_type or "(unknown)", header.control_id or "-",
                code, text)  # fmt: skip
    metrics.MESSAGES.labels(code, "not-applicable" if code == "AE" else "unreadable").inc()
    try:
        services.record_failure(header=header, raw=raw, ack=answer, ack_code=code, error=text, peer_address=peer)
    except Exception as exc:
        log.error("HL7 control=%s not recorded: %s", header.control_id or "-", type(exc).__name__)
    return ack.encode(answer, header.encoding)
