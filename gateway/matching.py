"""PS3.4 C.2.2.2 attribute matching as Django Q objects, shared by Q/R and worklist C-FIND.

Every kind of matching becomes SQL: nothing is filtered in Python. Values in
the index are DICOM strings (DA "YYYYMMDD", TM "HHMMSS.FFFFFF"), so ranges are
string comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from django.db.models import CharField, Lookup, Q, TextField

DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
INTEGER_VRS = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
DECIMAL_VRS = frozenset({"DS", "FL", "FD"})
# PS3.4 C.2.2.2.4: no wildcard matching for these; '*' or '?' are then plain characters.
NO_WILDCARD_VRS = DATE_TIME_VRS | INTEGER_VRS | DECIMAL_VRS | {"OB", "OW", "UN", "AT", "AS", "UI"}
_RANGE_VALUE = re.compile(r"^[0-9.+]*$")
# Matches no row without asking the database: the answer to a value no stored value can equal.
NOTHING = Q(pk__in=[])


class QueryValueError(ValueError):
    """A query value that no matching rule accepts (a malformed range, a non-numeric IS...).

    The message never repeats the value: it may be a birth date, and it reaches the log.
    """


def _dicom_pattern(value: str, vendor: str) -> str:
    """Turn a DICOM wildcard value into a GLOB (SQLite) or LIKE (others) pattern with literal % and _."""
    if vendor == "sqlite":
        # GLOB is case-sensitive and knows * and ?; only [ needs escaping.
        return value.replace("[", "[[]")
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


class DicomWildcard(Lookup):
    """`field__dicom_wildcard="SMI*"`: '*' any run, '?' one character, everything else literal, case-sensitive.

    SQLite's LIKE ignores ASCII case and PostgreSQL's does not, so SQLite uses GLOB.
    """

    lookup_name = "dicom_wildcard"
    case_sensitive = True

    def as_sql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        rhs_params = [_dicom_pattern(str(param), connection.vendor) for param in rhs_params]
        if connection.vendor == "sqlite":
            if not self.case_sensitive:  # SQLite's UPPER folds ASCII only
                lhs, rhs = f"UPPER({lhs})", f"UPPER({rhs})"
            return f"{lhs} GLOB {rhs}", [*lhs_params, *rhs_params]
        if not self.case_sensitive:
            # Not ILIKE: UPPER(col) LIKE ... can use an index on UPPER(col) with a pattern opclass
            # (worklist migration 0003); ILIKE needs a trigram index for any prefix.
            lhs, rhs = f"UPPER({lhs})", f"UPPER({rhs})"
        return f"{lhs} LIKE {rhs} ESCAPE '\\'", [*lhs_params, *rhs_params]


class DicomWildcardIgnoreCase(DicomWildcard):
    """`field__dicom_iwildcard`: the same, ignoring case (PN where configured)."""

    lookup_name = "dicom_iwildcard"
    case_sensitive = False


for _field in (CharField, TextField):
    _field.register_lookup(DicomWildcard)
    _field.register_lookup(DicomWildcardIgnoreCase)


def query_values(value: object) -> list[str]:
    """The values of a query element as strings: [] for zero length, several for a backslash list."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = [str(item) for item in value]
    else:
        values = str(value).split("\\")
    return [item for item in (v.strip() for v in values) if item]


def is_universal(value: object) -> bool:
    """PS3.4 C.2.2.2.3: zero length, or a lone '*', matches everything."""
    values = query_values(value)
    return not values or values == ["*"]


def is_single_value(value: object, vr: str) -> bool:
    """True for one value with no wildcard or range: what a unique key above the query level needs."""
    values = query_values(value)
    if len(values) != 1:
        return False
    if vr in DATE_TIME_VRS:
        return "-" not in values[0]
    return vr in NO_WILDCARD_VRS or not any(char in values[0] for char in "*?")


def storable(value: str) -> bool:
    """False for a value no index column can hold (a NUL: PostgreSQL refuses it even as a parameter)."""
    return "\x00" not in value


def match(field: str, vr: str, value: object, *, ignore_case: bool = False) -> Q:
    """A Q object for matching `field` (of VR `vr`) against a C-FIND query value.

    `ignore_case` applies to PN only (PS3.4 C.2.2.2.1: case-insensitive PN matching is configurable).
    Raises QueryValueError for a value that cannot be matched.
    """
    if is_universal(value):
        return Q()
    values = query_values(value)
    if vr == "UI" and len(values) > 1:
        uids = [uid for uid in values if storable(uid)]
        return Q(**{f"{field}__in": uids}) if uids else NOTHING  # PS3.4 C.2.2.2.2 list of UID matching
    combined = Q()
    for single in values:  # several values: an entity matching any of them matches
        if storable(single):
            combined |= _match_one(field, vr, single, ignore_case=ignore_case and vr == "PN")
        else:
            combined |= NOTHING
    return combined


def _match_one(field: str, vr: str, value: str, *, ignore_case: bool) -> Q:
    if vr in DATE_TIME_VRS:
        return _match_date_time(field, vr, value)
    if vr in INTEGER_VRS or vr in DECIMAL_VRS:
        return _match_number(field, vr, value)
    if vr == "PN":
        value = value.rstrip("^=")  # trailing empty components are insignificant
    if vr not in NO_WILDCARD_VRS and ("*" in value or "?" in value):
        lookup = "dicom_iwildcard" if ignore_case else "dicom_wildcard"
        return Q(**{f"{field}__{lookup}": value})  # PS3.4 C.2.2.2.4
    if ignore_case:
        return Q(**{f"{field}__iexact": value})
    return Q(**{field: value})  # PS3.4 C.2.2.2.1


def _match_number(field: str, vr: str, value: str) -> Q:
    try:
        number = int(value) if vr in INTEGER_VRS else float(value)
    except ValueError:
        raise QueryValueError(f"not a valid {vr} value") from None
    return Q(**{field: number})


def _match_date_time(field: str, vr: str, value: str) -> Q:
    """Single value or PS3.4 C.2.2.2.5 range (A-B, A-, -B); a shorter TM/DT value covers its whole span."""
    if value.count("-") > 1:
        raise QueryValueError(f"not a valid {vr} value or range")
    if "-" not in value:
        _check_date_time(vr, value)
        if vr == "DA":
            return Q(**{field: value})
        return Q(**{field: value}) | Q(**{f"{field}__startswith": value})
    lower, upper = (part.strip() for part in value.split("-"))
    _check_date_time(vr, lower)
    _check_date_time(vr, upper)
    condition = ~Q(**{field: ""})  # an empty value is not in any range
    if lower:
        condition &= Q(**{f"{field}__gte": lower})
    if upper:
        # "1200" as an upper bound includes 12:00:59.9: anything it is a prefix of.
        condition &= Q(**{f"{field}__lte": upper}) | Q(**{f"{field}__startswith": upper})
    return condition


def _check_date_time(vr: str, value: str) -> None:
    if not _RANGE_VALUE.match(value) or (vr == "DA" and value and len(value) != 8):
        raise QueryValueError(f"not a valid {vr} value")
