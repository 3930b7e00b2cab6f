"""One HL7 message in, one ACK out: read, map, apply in a transaction, answer after the commit.

AA once the change is committed; AE (with ERR) for a message understood but
not applicable; AR for one that cannot be read or is of a type we do not
handle (HL7 v2.5 2.9.2, original acknowledgment mode). A repeated control ID
(MSH-10) of an applied message gets its stored ACK again and changes nothing.
Logs carry message type, control ID and accession numbers only.
"""

from __future__ import annotations

import logging

from django.db import close_old_connections

from worklist import services
from worklist.errors import INTERNAL_ERROR, Rejected, WorklistError
from worklist.hl7 import ack, mapping

log = logging.getLogger("isthmus.hl7")


def handle_message(raw: bytes, peer: str = "") -> bytes:
    """The MLLP server's handler: the ACK bytes for one message (never raises)."""
    close_old_connections()
    try:
        parsed = mapping.read(raw)
    except Rejected as exc:
        return _answer_failure(mapping.lenient_header(raw), raw.decode("latin-1"), "AR", exc.text, exc.code, "", peer)
    header = parsed.header
    try:
        replay = services.stored_ack(header=header)
        if replay is not None:
            log.info("HL7 %s control=%s repeated: stored ACK sent again", header.message_type, header.control_id)
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
    except Exception as exc:  # the database is down or a bug: say so, do not crash the connection
        log.error("HL7 %s control=%s failed: %s", header.message_type, header.control_id, type(exc).__name__)
        log.debug("HL7 failure detail", exc_info=True)
        return ack.encode(ack.build(header, "AE", error_text="internal error", error_code=INTERNAL_ERROR),
                          header.encoding)  # fmt: skip
    accessions = ",".join(order.accession_number for order in orders)
    if applied:
        log.info("HL7 %s control=%s applied: AA%s", header.message_type, header.control_id,
                 f" accession={accessions}" if accessions else "")  # fmt: skip
    else:
        log.info("HL7 %s control=%s repeated: stored ACK sent again", header.message_type, header.control_id)
    return ack.encode(row.ack, header.encoding)


def _answer_failure(
    header: mapping.Header, raw: str, code: str, text: str, error_code: str, location: str, peer: str
) -> bytes:
    answer = ack.build(header, code, error_text=text, error_code=error_code, error_location=location)
    log.warning("HL7 %s control=%s answered %s: %s", header.message_type or "(unknown)", header.control_id or "-",
                code, text)  # fmt: skip
    try:
        services.record_failure(header=header, raw=raw, ack=answer, ack_code=code, error=text, peer_address=peer)
    except Exception as exc:
        log.error("HL7 control=%s not recorded: %s", header.control_id or "-", type(exc).__name__)
    return ack.encode(answer, header.encoding)
