"""Modality Worklist Information Model - FIND SCP (PS3.4 K.6), thin over worklist/selectors.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.conf import settings
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

from gateway import metrics
from gateway.dimse import reactor
from gateway.dimse.handlers import allowed
from gateway.dimse.identifiers import MalformedIdentifier, read_identifier
from gateway.dimse.status import Status
from worklist import selectors

log = logging.getLogger("isthmus.dimse")

# PS3.4 K.4.1.1.4 (C-FIND statuses, as in C.4.1.1.4)
Status.add("IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS", 0xA900)
Status.add("PENDING_WARNING_OPTIONAL_KEYS", 0xFF01)


def add_contexts(ae: AE) -> None:
    ae.add_supported_context(ModalityWorklistInformationFind)


def _failure(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _count(status: int) -> None:
    metrics.DIMSE_REQUESTS.labels("worklist", f"0x{status:04X}").inc()


def handle_find(event: evt.Event) -> Iterator[tuple]:
    """EVT_C_FIND: one pending answer per open scheduled step, up to WORKLIST_LIMIT; C-CANCEL honoured."""
    if not allowed(event, "worklist"):
        _count(Status.REFUSED_NOT_AUTHORIZED)
        yield Status.REFUSED_NOT_AUTHORIZED, None
        return
    try:
        identifier = read_identifier(event)
        query = selectors.parse_query(identifier, ignore_case_pn=settings.WORKLIST_PN_CASE_INSENSITIVE)
        rows = selectors.find_steps(query, settings.WORKLIST_LIMIT + 1)
    except (selectors.QueryError, MalformedIdentifier) as exc:
        log.info("worklist C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
        _count(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        yield _failure(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        return
    if len(rows) > settings.WORKLIST_LIMIT:
        log.warning("worklist C-FIND: answers cut at ISTHMUS_WORKLIST_LIMIT=%d", settings.WORKLIST_LIMIT)
        rows = rows[: settings.WORKLIST_LIMIT]
    charset = selectors.query_character_set(identifier)
    # PS3.4 C.4.1.1.4: FF01 tells the SCU some of its optional keys were not supported.
    pending = Status.PENDING_WARNING_OPTIONAL_KEYS if query.unsupported else Status.PENDING
    for row in rows:
        reactor.let_the_peer_speak(event.assoc)
        if event.is_cancelled:
            _count(Status.CANCEL)
            yield Status.CANCEL, None
            return
        yield pending, selectors.set_character_set(selectors.response_identifier(query, row), charset)
    _count(Status.SUCCESS)


SOP_CLASSES = (ModalityWorklistInformationFind,)
HANDLERS = [(evt.EVT_C_FIND, handle_find)]
