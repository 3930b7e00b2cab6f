"""Rule conditions: does an instance match? Plain functions, used by the outbox and by the admin.

A rule's conditions map a DICOM keyword (or CallingAE / CalledAE) to a
pattern; every condition must match. Patterns:

- `CT`: equals (case-sensitive, surrounding spaces ignored);
- `CT*`, `C?`: wildcards, `*` any run of characters, `?` one character;
- `re:(?i)chest`: a regular expression, searched anywhere in the value;
- `range:20240101-20241231`: inclusive range, numeric when the bounds and
  the value are numbers (DA, TM and DT values are, given bounds in the same
  format: `range:080000-120000` for times), else text order; either side may
  be left open (`range:20240101-`); use `..` as the separator when a bound is
  negative (`range:-5..5`).

A multi-valued attribute matches when any of its values does; a missing one
is the empty string (so only `*`, `re:` patterns matching "" and `""` match it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

AE_KEYWORDS = ("CallingAE", "CalledAE")
Matcher = Callable[[str], bool]


class InvalidCondition(ValueError):
    """A condition that can never be evaluated: unknown keyword, bad regex or bad range."""


@dataclass(frozen=True)
class CompiledRule:
    """A rule ready to evaluate, with the enabled destinations it sends to."""

    rule_id: int
    name: str
    is_default: bool
    stop: bool
    destination_ids: tuple[int, ...]
    conditions: tuple[tuple[str, Matcher], ...] = field(default=())

    def matches(self, values: Mapping[str, Iterable[str]]) -> bool:
        return all(any(match(value) for value in values[keyword]) for keyword, match in self.conditions)


def compile_pattern(pattern: str) -> Matcher:
    """A predicate over one attribute value (as text); raises InvalidCondition."""
    if not isinstance(pattern, str):
        pattern = str(pattern)
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise InvalidCondition(f"bad regular expression {pattern[3:]!r}: {exc}") from exc
        return lambda value: regex.search(value) is not None
    if pattern.startswith("range:"):
        return _range(pattern[6:])
    pattern = pattern.strip()
    if "*" in pattern or "?" in pattern:
        regex = re.compile(_wildcard(pattern), re.DOTALL)
        return lambda value: regex.fullmatch(value) is not None
    return lambda value: value == pattern


def _wildcard(pattern: str) -> str:
    """PS3.4 C.2.2.2.4 style: only `*` and `?` are special; everything else is literal."""
    return "".join(".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)


def _range(body: str) -> Matcher:
    low, separator, high = body.partition("..") if ".." in body else body.partition("-")
    low, high = low.strip(), high.strip()
    if not separator or (not low and not high):
        raise InvalidCondition(f"bad range {body!r}: expected LOW-HIGH, LOW- or -HIGH")
    numeric = all(_number(bound) is not None for bound in (low, high) if bound)

    def within(value: str) -> bool:
        if numeric and (number := _number(value)) is not None:
            return (not low or number >= float(low)) and (not high or number <= float(high))
        if not value:
            return False
        return (not low or value >= low) and (not high or value <= high)

    return within


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def keyword_tag(keyword: str) -> int | None:
    """The tag of a condition's keyword; None for CallingAE/CalledAE; raises InvalidCondition if unknown."""
    if keyword in AE_KEYWORDS:
        return None
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InvalidCondition(f"{keyword!r} is not a DICOM keyword (nor CallingAE or CalledAE)")
    return tag


def compile_conditions(conditions: Mapping[str, object]) -> tuple[tuple[str, Matcher], ...]:
    """Check and compile a rule's conditions; raises InvalidCondition naming the bad one."""
    if not isinstance(conditions, Mapping):
        raise InvalidCondition("conditions must be a mapping from keyword to pattern")
    compiled = []
    for keyword, pattern in conditions.items():
        keyword_tag(keyword)
        compiled.append((keyword, _cached_pattern(str(pattern))))
    return tuple(compiled)


@lru_cache(maxsize=1024)
def _cached_pattern(pattern: str) -> Matcher:
    return compile_pattern(pattern)


def validate_conditions(conditions: object) -> list[str]:
    """Errors in a rule's conditions, as sentences (empty when all is well): for forms and config import."""
    if not isinstance(conditions, Mapping):
        return ["conditions must be a mapping from keyword to pattern"]
    errors = []
    for keyword, pattern in conditions.items():
        try:
            compile_conditions({keyword: pattern})
        except InvalidCondition as exc:
            errors.append(str(exc))
    return errors


def values_of(dataset: Dataset, keyword: str) -> list[str]:
    """An attribute's values as text ([""] when absent, or too malformed for pydicom to decode), for matching.

    Values stay raw until read (part10.read_header), so a malformed one surfaces here: it must cost the
    instance its match on that attribute, not its storage (indexing.text treats it the same way).
    """
    try:
        element = dataset.get(keyword)
    except Exception:
        return [""]
    if element is None:
        return [""]
    value = element.value if hasattr(element, "value") else element
    if value is None:
        return [""]
    if isinstance(value, MultiValue | list | tuple):
        return [str(item).strip() for item in value] or [""]
    if isinstance(value, bytes):
        return [value.decode("ascii", "replace").strip("\0 ")]
    return [str(value).strip()]


def instance_values(
    dataset: Dataset, keywords: Iterable[str], *, calling_ae: str, called_ae: str
) -> dict[str, list[str]]:
    """What the conditions look at for one instance."""
    values = {}
    for keyword in keywords:
        if keyword == "CallingAE":
            values[keyword] = [calling_ae.strip()]
        elif keyword == "CalledAE":
            values[keyword] = [called_ae.strip()]
        else:
            values[keyword] = values_of(dataset, keyword)
    return values


def conditions_match(
    conditions: Mapping[str, object], dataset: Dataset, *, calling_ae: str = "", called_ae: str = ""
) -> bool:
    """Does one instance match these conditions? (The admin's "test this rule" and the tests use it.)"""
    compiled = compile_conditions(conditions)
    values = instance_values(dataset, [k for k, _ in compiled], calling_ae=calling_ae, called_ae=called_ae)
    return all(any(match(value) for value in values[keyword]) for keyword, match in compiled)


def select(rules: Iterable[CompiledRule], values: Mapping[str, list[str]]) -> list[tuple[int, int]]:
    """(rule id, destination id) pairs for one instance; ordered rules, 'stop', defaults only if nothing matched.

    A destination selected by several rules is owed the instance once, under the first rule.
    """
    chosen: dict[int, int] = {}
    defaults: list[CompiledRule] = []
    matched = False
    for rule in rules:
        if rule.is_default:
            defaults.append(rule)
            continue
        if not rule.matches(values):
            continue
        matched = True
        for destination_id in rule.destination_ids:
            chosen.setdefault(destination_id, rule.rule_id)
        if rule.stop:
            break
    if not matched:
        for rule in defaults:
            if rule.matches(values):
                for destination_id in rule.destination_ids:
                    chosen.setdefault(destination_id, rule.rule_id)
                if rule.stop:
                    break
    return [(rule_id, destination_id) for destination_id, rule_id in chosen.items()]
