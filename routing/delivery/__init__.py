"""Senders: one batch of instances to one destination, with a result per instance.

dimse.py sends over one association (C-STORE), stow.py in one STOW-RS request.
Both report per instance, so one bad instance does not fail or resend a whole
batch, and both raise DeliveryError when the batch as a whole could not go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DELIVERED, RETRY, DEAD = "delivered", "retry", "dead"


@dataclass(frozen=True)
class Item:
    """One instance of a batch: its job and its stored file."""

    job_id: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int


@dataclass(frozen=True)
class Result:
    """How one instance fared: delivered, retry (transient) or dead (permanent), with the peer's status."""

    job_id: int
    outcome: str
    status: str = ""
    error: str = ""
    retry_after: float | None = None  # seconds the peer asked us to wait (HTTP 429/503 Retry-After)


class DeliveryError(Exception):
    """The batch as a whole did not go (peer down, refused, timed out). Permanent ones are not retried."""

    def __init__(self, message: str, *, permanent: bool = False, status: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.permanent, self.status, self.retry_after = permanent, status, retry_after


def dicom_status_outcome(code: int) -> str:
    """PS3.4 B.2.3 / PS3.18 I.2: what a C-STORE status or STOW-RS FailureReason means for the job."""
    if code in (0x0000, 0x0111) or 0xB000 <= code <= 0xBFFF:  # success, duplicate (it has it), warnings
        return DELIVERED
    if 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF or code in (0x0122, 0x0124):
        return DEAD  # data set does not match SOP class, cannot understand, class not supported, refused
    return RETRY  # 0xA7xx out of resources, 0x0110 processing failure, anything unknown
