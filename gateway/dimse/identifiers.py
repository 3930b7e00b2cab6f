"""Reading a C-FIND, C-MOVE or C-GET identifier from a peer that may send anything.

pydicom decodes an identifier when it is first read and each element when it
is first touched, and bad bytes raise whatever the decoder meets (a length
that does not fit the VR, a character set that is not one, an item tag where
an element belongs). Decoding everything here, at once, turns all of them
into one refusal the handler answers with 0xA900 before any matching starts.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import evt

# Deeper than any query model needs (MWL: a sequence in a sequence); pydicom itself recurses per level.
MAX_SEQUENCE_DEPTH = 8


class MalformedIdentifier(ValueError):
    """An identifier that cannot be decoded; the message names the error's type only (values may be patient data)."""


def read_identifier(event: evt.Event) -> Dataset:
    """The request's identifier with every element decoded; raises MalformedIdentifier."""
    try:
        identifier = event.identifier
        _decode(identifier, depth=0)
    except MalformedIdentifier:
        raise
    except Exception as exc:  # pydicom raises many types for bad bytes; each is the peer's error
        raise MalformedIdentifier(f"identifier cannot be decoded: {type(exc).__name__}") from None
    return identifier


def _decode(dataset: Dataset, depth: int) -> None:
    if depth > MAX_SEQUENCE_DEPTH:
        raise MalformedIdentifier("identifier sequences are nested too deep")
    for element in dataset:  # iterating converts each raw element, decoding its value
        if element.VR == "SQ":
            for item in element.value:
                _decode(item, depth + 1)
