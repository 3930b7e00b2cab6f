"""The one error the worklist services raise for input they understand but cannot apply."""

from __future__ import annotations

# HL7 Table 0357 (message error condition codes) used in ERR-3.
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
VALUE_TOO_LONG = "104"  # v2.7: "or the length the application is able to safely handle"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNKNOWN_KEY = "204"
DUPLICATE_KEY = "205"
RECORD_LOCKED = "206"  # the transaction could not be performed at the storage level (database down or locked)
INTERNAL_ERROR = "207"


class WorklistError(ValueError):
    """An order or patient change that cannot be applied; HL7 answers it with AE and an ERR segment.

    `location` is an HL7 field (e.g. "OBR-18") when the cause is one field of a message.
    """

    def __init__(self, text: str, *, code: str = INTERNAL_ERROR, location: str = "") -> None:
        super().__init__(text)
        self.text, self.code, self.location = text, code, location


class Rejected(ValueError):
    """An HL7 message we cannot read or do not handle: answered with AR (HL7 v2.5 2.9.2)."""

    def __init__(self, text: str, code: str = "100") -> None:
        super().__init__(text)
        self.text, self.code = text, code
