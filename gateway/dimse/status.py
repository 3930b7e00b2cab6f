"""DIMSE status codes Isthmus answers with (PS3.7 Annex C), named once."""

from pynetdicom.status import Status

# PS3.7 C.5.4: the requester is not allowed to use this service.
Status.add("REFUSED_NOT_AUTHORIZED", 0x0124)
Status.add("PROCESSING_FAILURE", 0x0110)

__all__ = ["Status"]
