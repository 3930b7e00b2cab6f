"""DIMSE status codes Isthmus answers with (PS3.7 Annex C), named once."""

from pynetdicom.status import Status

# PS3.7 C.5.4: the requester is not allowed to use this service.
Status.add("REFUSED_NOT_AUTHORIZED", 0x0124)
Status.add("PROCESSING_FAILURE", 0x0110)

__all__ = ["Status"]

# --- Storage (C-STORE and the store behind STOW-RS), PS3.4 B.2.3 ---
# Disk below the free-space watermark: transient, the modality retries later.
Status.add("OUT_OF_RESOURCES", 0xA700)
# The index database cannot be reached. Also in the A7xx "Refused: Out of
# Resources" range, because it is transient and a modality should queue and
# retry; a distinct code so the peer's log tells the two causes apart.
Status.add("INDEX_UNAVAILABLE", 0xA701)
# Larger than ISTHMUS_MAX_INSTANCE_MB: A7xx too (the only refusal PS3.4 B.2.3 has for size), its own code for the log.
Status.add("INSTANCE_TOO_LARGE", 0xA702)
# The data set's SOP Class or Instance UID differs from the C-STORE command's.
Status.add("DATASET_MISMATCH", 0xA900)
# Not a parseable DICOM data set (truncated, malformed, unusable UIDs).
Status.add("CANNOT_UNDERSTAND", 0xC000)
# PS3.7 C.5: duplicate SOP Instance with different bytes under the "reject" policy.
Status.add("DUPLICATE_SOP_INSTANCE", 0x0111)
