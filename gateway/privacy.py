"""Patient data stays out of logs: query strings shown without values, pydicom kept quiet.

QIDO-RS searches put patient names, IDs and birth dates in the query string, and pydicom's
warnings quote the invalid values they meet ("Invalid value for VR DA: '1958-14-31'"). Logs keep
what an operator needs: peers, paths, UIDs, accession numbers, statuses, and which parameters a
request had.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from urllib.parse import unquote_plus

MASK = "***"
# Parameters of our own URLs that are not DICOM attributes (QIDO-RS options, the admin's and the API's).
OPTIONS = frozenset(
    ("limit", "offset", "fuzzymatching", "includefield", "quality", "viewport", "window", "annotation", "charset",
     "accept", "q", "o", "p", "e", "next", "status", "source", "accession_number")
)  # fmt: skip
_TAG = re.compile(r"[0-9a-f]{8}")
# A query string inside free text: from "?" to the next blank or quote.
_QUERY_IN_TEXT = re.compile(r"\?([^\s'\"<>]*)")


@functools.cache
def _keywords() -> frozenset[str]:
    from pydicom.datadict import keyword_dict

    return frozenset(keyword.lower() for keyword in keyword_dict)


def _named(name: str) -> bool:
    """A parameter name worth showing: an option of ours, a DICOM keyword or tag (any case), or a path of them."""
    parts = name.lower().split(".")
    return all(part in OPTIONS or part in _keywords() or _TAG.fullmatch(part) for part in parts)


def mask_query(query: str) -> str:
    """`PatientName=DOE^J&limit=5` -> `PatientName=***&limit=***`; a name that is no known parameter is masked too."""
    if not query:
        return query
    masked = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        if not _named(unquote_plus(name).strip()):
            masked.append(MASK)
        else:
            masked.append(f"{name}={MASK}" if equals else name)
    return "&".join(masked)


def mask_url(url: str) -> str:
    """A URL or path with its query string masked (mask_query)."""
    path, question, query = url.partition("?")
    return f"{path}?{mask_query(query)}" if question else url


def mask_text(text: str) -> str:
    """Every query string inside a line of text masked."""
    if "?" not in text:
        return text
    return _QUERY_IN_TEXT.sub(lambda match: "?" + mask_query(match.group(1)), text)


class MaskQueryStrings(logging.Filter):
    """A handler filter: records whose message holds a query string are rewritten with it masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def quiet_pydicom() -> None:
    """pydicom neither validates values as it reads and writes nor warns (its warnings quote the values).

    The gateway stores what it receives as it is; a value it must understand is checked where it is used.
    The `pydicom` logger is at ERROR in settings.LOGGING.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
