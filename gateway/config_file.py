"""Configuration as a file: export the registry as YAML, import it back as a diff.

A section present in the file (`nodes`, later `destinations` and `rules`) is
the desired state of that section: objects are created, changed, or deleted
to match it. Everything is validated before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import models, transaction

from gateway.models import Node


@dataclass(frozen=True)
class Section:
    """One top-level list of the file: which model, which fields, which are required."""

    key: str
    noun: str
    model: type[models.Model]
    fields: tuple[str, ...]
    required: tuple[str, ...]


NODE_FIELDS = (
    "name", "ae_title", "host", "port", "description", "enabled", "allowed_in", "allowed_out",
    "allow_echo", "allow_store", "allow_worklist", "allow_mpps", "allow_query_retrieve", "allow_commitment",
)  # fmt: skip
SECTIONS: dict[str, Section] = {
    "nodes": Section("nodes", "node", Node, NODE_FIELDS, ("name", "ae_title", "host", "port")),
}
# Sections the file format reserves for routing; accepted empty until that app registers them.
RESERVED = ("destinations", "rules")


class ConfigError(ValueError):
    """A file that cannot be applied; `errors` names each object and field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class Change:
    action: str  # "create", "update" or "delete"
    noun: str
    name: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.action == "create":
            values = ", ".join(f"{k}={v!r}" for k, (_, v) in self.fields.items() if k != "name")
            return f"+ {self.noun} {self.name}: {values}"
        if self.action == "delete":
            return f"- {self.noun} {self.name}"
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.fields.items())
        return f"~ {self.noun} {self.name}: {changes}"


def export_config() -> str:
    """The whole registry as YAML, one mapping per object, ordered by name."""
    document: dict[str, list[dict[str, Any]]] = {}
    for section in SECTIONS.values():
        document[section.key] = [
            {name: getattr(obj, name) for name in section.fields} for obj in section.model.objects.order_by("name")
        ]
    for key in RESERVED:
        document.setdefault(key, [])
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _load(text: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"]) from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(["the file must be a mapping with lists nodes, destinations, rules"])
    unknown = sorted(set(document) - set(SECTIONS) - set(RESERVED))
    errors = [f"unknown top-level key {key!r}" for key in unknown]
    for key in RESERVED:
        if key not in SECTIONS and document.get(key):
            errors.append(f"{key}: not supported by this version of Isthmus yet")
    if errors:
        raise ConfigError(errors)
    return document


def _plan_section(section: Section, entries: Any) -> tuple[list[Change], list[models.Model], list[str]]:
    """Validate one section against the database; return changes, objects to save, and errors."""
    if not isinstance(entries, list):
        return [], [], [f"{section.key}: must be a list"]
    changes: list[Change] = []
    to_save: list[models.Model] = []
    errors: list[str] = []
    existing = {obj.name: obj for obj in section.model.objects.all()}
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        label = f"{section.key}[{index}]"
        if not isinstance(entry, dict):
            errors.append(f"{label}: must be a mapping")
            continue
        name = entry.get("name")
        label = f"{section.noun} {name!r}" if name else label
        bad = [f"{label}: unknown field {key!r}" for key in entry if key not in section.fields]
        bad += [f"{label}: missing field {key!r}" for key in section.required if key not in entry]
        if name in seen:
            bad.append(f"{label}: name appears twice")
        if bad:
            errors.extend(bad)
            continue
        seen.add(name)
        obj = existing.get(name) or section.model()
        before = {key: getattr(obj, key) for key in section.fields}
        for key, value in entry.items():
            setattr(obj, key, "" if value is None and key in ("host", "description") else value)
        try:
            obj.full_clean(validate_unique=False)
        except ValidationError as exc:
            errors.extend(f"{label}: field {key!r}: {' '.join(msgs)}" for key, msgs in exc.message_dict.items())
            continue
        after = {key: getattr(obj, key) for key in section.fields}
        if obj.pk is None:
            changes.append(Change("create", section.noun, name, {k: (None, v) for k, v in after.items()}))
            to_save.append(obj)
        else:
            diff = {k: (before[k], after[k]) for k in section.fields if before[k] != after[k]}
            if diff:
                changes.append(Change("update", section.noun, name, diff))
                to_save.append(obj)
    for name in sorted(set(existing) - seen):
        changes.append(Change("delete", section.noun, name))
    return changes, to_save, errors


def import_config(text: str, *, dry_run: bool = False) -> list[Change]:
    """Apply a configuration file, all or nothing; returns the changes (made, or that would be)."""
    document = _load(text)
    plans = []
    errors: list[str] = []
    for key, section in SECTIONS.items():
        if key in document:
            changes, to_save, section_errors = _plan_section(section, document[key])
            plans.append((section, changes, to_save))
            errors.extend(section_errors)
    if errors:
        raise ConfigError(errors)
    if not dry_run:
        with transaction.atomic():
            for section, changes, to_save in plans:
                deleted = [c.name for c in changes if c.action == "delete"]
                section.model.objects.filter(name__in=deleted).delete()
                for obj in to_save:
                    obj.save()
    return [change for _, changes, _ in plans for change in changes]
