"""Query/Retrieve SCP, PS3.4 Annex C: Patient Root and Study Root C-FIND, C-MOVE and C-GET.

The handlers are thin generators over gateway/qr.py. Two things pynetdicom's
Q/R service class cannot do alone are added here:
- refuse a C-MOVE (not authorised, bad identifier) before it opens the
  sub-association: its handler's first answer must be a destination;
- send each instance as its stored file, in chunks, instead of a re-encoded
  data set (byte-identical, and pixel data never loaded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, association, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway import metrics, qr, store
from gateway.dimse import reactor
from gateway.dimse.handlers import allowed
from gateway.dimse.identifiers import MalformedIdentifier, read_identifier
from gateway.dimse.sockets import set_nodelay
from gateway.dimse.status import Status
from gateway.models import Node

log = logging.getLogger("isthmus.dimse")

# PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4
Status.add("IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS", 0xA900)
Status.add("PENDING_WARNING_OPTIONAL_KEYS", 0xFF01)

ROOTS = {
    PatientRootQueryRetrieveInformationModelFind: qr.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: qr.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: qr.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: qr.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: qr.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: qr.STUDY_ROOT,
}
RETRIEVE_CLASSES = {
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
}
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255
# pynetdicom accepts the first of its own syntaxes the requestor proposes: explicit VR
# little endian first, as most stored files are, so C-GET can send them unconverted.
GET_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]


def add_contexts(ae: AE) -> None:
    """Q/R contexts, plus storage contexts in which a C-GET requestor may take the SCP role.

    Call after the storage module: an existing storage context keeps its
    transfer syntaxes and only gains role selection.
    """
    for sop_class in ROOTS:
        ae.add_supported_context(sop_class)
    supported = {context.abstract_syntax: context for context in ae.supported_contexts}
    for storage in AllStoragePresentationContexts:
        context = supported.get(storage.abstract_syntax)
        if context is None:
            ae.add_supported_context(storage.abstract_syntax, GET_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        else:  # PS3.4 C.4.3: the C-GET requestor proposes the SCP role for the storage sub-operations
            context.scu_role, context.scp_role = True, True
    # C-MOVE opens sub-associations from this AE: bound the TCP connect too.
    if ae.connection_timeout is None:
        ae.connection_timeout = settings.DIMSE_TIMEOUT
    # send_c_store(path) streams the file's data set as stored instead of decoding it.
    _config.STORE_SEND_CHUNKED_DATASET = True
    _install_service_class()


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


def _count(service: str, status: int | str) -> None:
    label = status if isinstance(status, str) else f"0x{status:04X}"
    metrics.DIMSE_REQUESTS.labels(service, label).inc()


# --- C-FIND ------------------------------------------------------------------


def handle_find(event: evt.Event) -> Iterator[tuple]:
    """EVT_C_FIND: pending responses for each match, up to FIND_LIMIT (PS3.4 C.4.1.2)."""
    if not allowed(event, "query_retrieve"):
        _count("find", Status.REFUSED_NOT_AUTHORIZED)
        yield Status.REFUSED_NOT_AUTHORIZED, None
        return
    root = ROOTS[event.request.AffectedSOPClassUID]
    try:
        query = qr.parse_query(root, read_identifier(event))
        rows = qr.find_rows(query, settings.FIND_LIMIT + 1)
    except (qr.QueryError, MalformedIdentifier) as exc:
        log.info("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
        _count("find", Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        yield _status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        return
    if len(rows) > settings.FIND_LIMIT:
        log.warning("C-FIND at %s level: answers cut at ISTHMUS_FIND_LIMIT=%d", query.level, settings.FIND_LIMIT)
        rows = rows[: settings.FIND_LIMIT]
    # PS3.4 C.4.1.1.4: FF01 tells the SCU some of its optional keys were not supported.
    pending = Status.PENDING_WARNING_OPTIONAL_KEYS if query.unsupported else Status.PENDING
    for row in rows:
        reactor.let_the_peer_speak(event.assoc)
        if event.is_cancelled:
            _count("find", Status.CANCEL)
            yield Status.CANCEL, None
            return
        yield pending, qr.response_identifier(query, row, settings.AE_TITLE)
    _count("find", Status.SUCCESS)


# --- C-MOVE and C-GET ---------------------------------------------------------


class StoredInstance(Dataset):
    """What the retrieve handlers yield: enough for pynetdicom's bookkeeping, and the file to send."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.stored_path = path


def _send_files_as_stored(assoc: association.Association) -> None:
    """Make `assoc.send_c_store` send a StoredInstance's file as stored (once per association)."""
    if getattr(assoc, "isthmus_sends_stored", False):
        return
    send = assoc.send_c_store

    def send_c_store(dataset, *args, **kwargs):
        if not isinstance(dataset, StoredInstance):
            return send(dataset, *args, **kwargs)
        try:
            return send(dataset.stored_path, *args, **kwargs)
        except ValueError:
            # No context with the file's own transfer syntax: let pynetdicom convert
            # between the uncompressed ones (it fails for compressed data, counted as a failure).
            return send(dcmread(dataset.stored_path), *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc.isthmus_sends_stored = True


def _retrieve_list(event: evt.Event) -> list[tuple[str, str, str, str]]:
    root = ROOTS[event.request.AffectedSOPClassUID]
    instances = qr.retrieve_instances(root, read_identifier(event))  # decoded once already: retrieve_refusal
    return list(instances.values_list("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "path"))


def _sub_operations(event: evt.Event, files: list[tuple[str, str, str, str]]) -> Iterator[tuple]:
    """One pending C-STORE sub-operation per file; pynetdicom counts them and sends the final status."""
    for sop_class_uid, sop_instance_uid, _syntax, path in files:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        yield Status.PENDING, StoredInstance(sop_class_uid, sop_instance_uid, store.stored_file(path))


def move_destination(ae_title: str | None) -> Node | None:
    """The registered, enabled node we may send to under this AE title (PS3.4 C.4.2.1.4.1)."""
    if not ae_title:
        return None
    nodes = Node.objects.filter(ae_title=ae_title.strip(), enabled=True, allowed_out=True).exclude(host="")
    return nodes.order_by("pk").first()


def _sub_association_contexts(files: list[tuple[str, str, str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax): files go as stored, no conversion."""
    pairs = sorted({(sop_class, syntax) for sop_class, _uid, syntax, _path in files})
    if len(pairs) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; instances beyond %d fail", len(pairs), MAX_CONTEXTS)
    return [build_context(sop_class, syntax) for sop_class, syntax in pairs[:MAX_CONTEXTS]]


def _open_sub_association(event: evt.Event) -> None:
    """EVT_CONN_OPEN of a C-MOVE sub-association."""
    set_nodelay(event)
    _send_files_as_stored(event.assoc)


def handle_move(event: evt.Event) -> Iterator:
    """EVT_C_MOVE: destination, number of sub-operations, then one pending per instance (PS3.4 C.4.2.2)."""
    node = move_destination(event.move_destination)
    if node is None:  # refused earlier; the node may have been removed since
        yield None, None
        return
    files = _retrieve_list(event)
    log.info("C-MOVE to %s: %d instances", node.ae_title, len(files))
    handlers = [(evt.EVT_CONN_OPEN, _open_sub_association)]
    yield node.host, node.port, {"contexts": _sub_association_contexts(files), "evt_handlers": handlers}
    yield len(files)
    yield from _sub_operations(event, files)
    _count("move", "completed")


def handle_get(event: evt.Event) -> Iterator:
    """EVT_C_GET: number of sub-operations, then one pending per instance, on this association (PS3.4 C.4.3.2)."""
    files = _retrieve_list(event)
    log.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title, len(files))
    _send_files_as_stored(event.assoc)
    yield len(files)
    yield from _sub_operations(event, files)
    _count("get", "completed")


def retrieve_refusal(event: evt.Event, service: str) -> Dataset | None:
    """Why a C-MOVE / C-GET must be refused before any sub-operation, as a status; None to go ahead."""
    if not allowed(event, "query_retrieve"):
        return _status(Status.REFUSED_NOT_AUTHORIZED)
    try:
        qr.retrieve_instances(ROOTS[event.request.AffectedSOPClassUID], read_identifier(event))
    except (qr.QueryError, MalformedIdentifier) as exc:
        return _status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    if service == "move" and move_destination(event.move_destination) is None:
        # PS3.4 C.4.2.1.4.1: only nodes registered, enabled and allowed out.
        return _status(Status.MOVE_DESTINATION_UNKNOWN, "move destination is not a registered node")
    return None


class QueryRetrieveService(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service, answering a refused C-MOVE or C-GET before its handler runs."""

    def _refused(self, req, context, service: str, event_type) -> bool:
        event = evt.Event(self.assoc, event_type, {"request": req, "context": context.as_tuple})
        status = retrieve_refusal(event, service)
        if status is None:
            return False
        log.info("C-%s from %s refused: 0x%04X", service.upper(), self.assoc.requestor.ae_title, status.Status)
        _count(service, int(status.Status))
        rsp = type(req)()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        self.dimse.send_msg(self.validate_status(status, rsp), context.context_id)
        return True

    def _move_scp(self, req, context) -> None:
        if not self._refused(req, context, "move", evt.EVT_C_MOVE):
            super()._move_scp(req, context)

    def _get_scp(self, req, context) -> None:
        if not self._refused(req, context, "get", evt.EVT_C_GET):
            super()._get_scp(req, context)


def _install_service_class() -> None:
    """Serve C-MOVE and C-GET with QueryRetrieveService; pynetdicom picks service classes by SOP class UID."""
    lookup = association.uid_to_service_class
    if getattr(lookup, "isthmus", False):
        return

    def service_class_for(uid: str):
        return QueryRetrieveService if uid in RETRIEVE_CLASSES else lookup(uid)

    service_class_for.isthmus = True
    association.uid_to_service_class = service_class_for


# The SOP classes HANDLERS serve: EVT_C_FIND is shared with the worklist module.
SOP_CLASSES = tuple(ROOTS)
HANDLERS = [
    (evt.EVT_C_FIND, handle_find),
    (evt.EVT_C_MOVE, handle_move),
    (evt.EVT_C_GET, handle_get),
]
