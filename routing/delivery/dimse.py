"""C-STORE a batch over one association, each file sent as stored whenever the peer takes its syntax."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config
from pynetdicom.presentation import PresentationContext, build_context

from gateway.dimse import outgoing
from routing.delivery import DEAD, RETRY, DeliveryError, Item, Result, dicom_status_outcome
from routing.models import Destination
from routing.ratelimit import Pacer

log = logging.getLogger("isthmus.routing")

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255
# Stored in these, an instance can be re-encoded losslessly if the peer refuses its own syntax.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
FALLBACK = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# send_c_store(path) streams the file's data set as stored instead of decoding it.
_config.STORE_SEND_CHUNKED_DATASET = True


def contexts_for(items: list[Item]) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax), so each file can go as stored; plus a little endian fallback."""
    pairs = list(dict.fromkeys((item.sop_class_uid, item.transfer_syntax_uid) for item in items))
    contexts = [build_context(sop_class, syntax) for sop_class, syntax in pairs]
    for sop_class in dict.fromkeys(sop_class for sop_class, syntax in pairs if syntax in UNCOMPRESSED):
        stored = {syntax for cls, syntax in pairs if cls == sop_class}
        fallback = [syntax for syntax in FALLBACK if syntax not in stored]
        if fallback:
            contexts.append(build_context(sop_class, fallback))
    if len(contexts) > MAX_CONTEXTS:
        log.warning("a batch needs %d presentation contexts; instances beyond %d wait", len(contexts), MAX_CONTEXTS)
    return contexts[:MAX_CONTEXTS]


def send_batch(destination: Destination, items: list[Item], report: Callable[[Result], None], pacer: Pacer) -> None:
    """Send every item on one association; report each result; raise DeliveryError if the batch cannot go."""
    node = destination.node
    if node is None:
        raise DeliveryError("the destination has no node", permanent=True)
    if not (node.enabled and node.allowed_out and node.host):
        raise DeliveryError(f"node {node.name} is disabled, not allowed out, or has no host")
    contexts = contexts_for(items)
    proposed = {(ctx.abstract_syntax, syntax) for ctx in contexts for syntax in ctx.transfer_syntax}
    where = f"{node.ae_title}@{node.host}:{node.port}"
    try:
        assoc = outgoing.associate(
            host=node.host,
            port=node.port,
            ae_title=node.ae_title,
            contexts=contexts,
            timeout=destination.read_timeout,
            connect_timeout=destination.connect_timeout,
        )
    except outgoing.NotAssociated as exc:
        raise DeliveryError(str(exc)) from exc
    try:
        accepted = {(ctx.abstract_syntax, ctx.transfer_syntax[0]) for ctx in assoc.accepted_contexts}
        for message_id, item in enumerate(items, 1):
            if not assoc.is_established:
                raise DeliveryError(f"association with {where} ended mid-batch")
            source = _source(item, accepted)
            if source is None and (item.sop_class_uid, item.transfer_syntax_uid) not in proposed:
                report(Result(item.job_id, RETRY, error="more presentation contexts than one association carries"))
                continue
            if source is None:
                report(Result(item.job_id, DEAD, error=f"{where} accepted no context for {item.sop_class_uid}"
                              f" in {item.transfer_syntax_uid} (nor little endian)"))  # fmt: skip
                continue
            pacer.wait(item.size)
            report(_store(assoc, item, source, message_id % 65536, where))
    finally:
        if assoc.is_established:
            assoc.release()


def _source(item: Item, accepted: set[tuple[str, str]]):
    """The file path when the peer takes the stored syntax, a decoded data set when only a fallback; else None."""
    if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
        return item.path
    if item.transfer_syntax_uid in UNCOMPRESSED and any((item.sop_class_uid, ts) in accepted for ts in FALLBACK):
        return dcmread(item.path)  # pynetdicom re-encodes between the uncompressed syntaxes
    return None


def _store(assoc, item: Item, source, message_id: int, where: str) -> Result:
    try:
        status = assoc.send_c_store(source, msg_id=message_id)
    except (ValueError, AttributeError) as exc:  # no usable context, unencodable data set
        return Result(item.job_id, DEAD, error=f"cannot send: {exc}"[:1000])
    if not status or "Status" not in status:
        return Result(item.job_id, RETRY, error=f"no C-STORE response from {where} (timeout or abort)")
    code = int(status.Status)
    outcome = dicom_status_outcome(code)
    comment = str(status.get("ErrorComment", "") or "")
    error = "" if outcome != RETRY and outcome != DEAD else f"C-STORE status 0x{code:04X} {comment}".strip()
    return Result(item.job_id, outcome, f"0x{code:04X}", error)
