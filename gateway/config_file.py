"""Configuration as a file: export the registry as YAML, import it back as a diff.

A section present in the file (`nodes`, `destinations`, `rules`, `hl7_senders`) is the desired
state of that section: objects are created, changed, or deleted to match it.
Everything is validated before anything is written. Objects refer to each
other by name (a destination's `node`, a rule's `destinations`), also to
objects created by the same file. Secrets are exported as "********" unless
asked for, and that mask on import keeps the current value, so an export
round-trips without leaking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import models, transaction

from gateway.encryption import UndecryptableSecret
from gateway.models import Hl7Sender, Node
from routing.models import Destination, Rule

SECRET_MASK = "********"


def _condition_errors(conditions: Any) -> list[str]:
    from routing.forms import condition_errors  # routing's own rule syntax

    return condition_errors(conditions)


def _undeletable_destinations(names: list[str]) -> list[str]:
    """Destinations the file drops that still owe instances: the import refuses them, with the count."""
    from routing import destinations  # routing's own rule: nothing undelivered is dropped

    owed = destinations.owed_jobs(Destination.objects.filter(name__in=names).values_list("pk", flat=True))
    names_by_id = dict(Destination.objects.filter(pk__in=owed).values_list("pk", "name"))
    return [str(destinations.DestinationInUse(names_by_id[pk], *counts)) for pk, counts in sorted(owed.items())]


def _delete_destinations(names: list[str]) -> None:
    from routing import destinations

    for destination in Destination.objects.filter(name__in=names):
        destinations.delete_destination(destination)


@dataclass(frozen=True)
class Section:
    """One top-level list of the file: which model, which fields, which are required, how fields map."""

    key: str
    noun: str
    model: type[models.Model]
    fields: tuple[str, ...]  # as named in the file
    required: tuple[str, ...]
    refs: dict[str, type[models.Model]] = field(default_factory=dict)  # foreign key by the other's name
    many: dict[str, type[models.Model]] = field(default_factory=dict)  # many-to-many by a list of names
    secrets: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)  # file key -> model attribute
    checks: dict[str, Callable[[Any], list[str]]] = field(default_factory=dict)
    omit_blank: bool = False  # export leaves out empty optional fields
    undeletable: Callable[[list[str]], list[str]] | None = None  # errors for objects that must not be deleted
    delete: Callable[[list[str]], None] | None = None  # how to delete by name, when not a plain delete()

    def attr(self, key: str) -> str:
        return self.aliases.get(key, key)


NODE_FIELDS = (
    "name", "ae_title", "host", "port", "description", "enabled", "allowed_in", "allowed_out",
    "allow_echo", "allow_store", "allow_worklist", "allow_mpps", "allow_query_retrieve", "allow_commitment",
)  # fmt: skip
DESTINATION_FIELDS = (
    "name", "kind", "description", "enabled", "paused", "node", "url", "auth", "username", "password", "token",
    "oauth_token_url", "oauth_client_id", "oauth_client_secret", "oauth_scope", "verify_tls", "ca_bundle",
    "connect_timeout", "read_timeout", "max_concurrency", "rate_instances", "rate_mbytes", "batch_size",
    "retry_attempts", "retry_first_delay", "retry_multiplier", "retry_max_delay", "retry_max_age",
)  # fmt: skip
RULE_FIELDS = ("name", "description", "order", "enabled", "default", "stop", "conditions", "destinations")
HL7_SENDER_FIELDS = ("name", "host", "message_types", "description", "enabled")
SECTIONS: dict[str, Section] = {
    "nodes": Section("nodes", "node", Node, NODE_FIELDS, ("name", "ae_title", "host", "port")),
    "destinations": Section(
        "destinations", "destination", Destination, DESTINATION_FIELDS, ("name", "kind"),
        refs={"node": Node}, secrets=Destination.SECRETS, omit_blank=True,
        undeletable=_undeletable_destinations, delete=_delete_destinations,
    ),
    "rules": Section(
        "rules", "rule", Rule, RULE_FIELDS, ("name", "destinations", "conditions"),
        many={"destinations": Destination}, aliases={"default": "is_default"},
        checks={"conditions": _condition_errors}, omit_blank=True,
    ),
    "hl7_senders": Section(
        "hl7_senders", "HL7 sender", Hl7Sender, HL7_SENDER_FIELDS, ("name", "host"), omit_blank=True,
    ),
}  # fmt: skip
RESERVED: tuple[str, ...] = ()  # sections a later version may add


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


def _file_value(section: Section, obj: models.Model, key: str) -> Any:
    """A field of an object as the file spells it: names for references, sorted names for lists."""
    if key in section.refs:
        related = getattr(obj, key)
        return related.name if related is not None else None
    if key in section.many:
        return sorted(related.name for related in getattr(obj, key).all()) if obj.pk else []
    return getattr(obj, section.attr(key))


def _is_blank(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _objects(section: Section) -> models.QuerySet:
    """The section's objects with what the file shows of their references, in three queries at most."""
    objects = section.model.objects.order_by("name")
    if section.refs:
        objects = objects.select_related(*section.refs)
    if section.many:
        objects = objects.prefetch_related(*section.many)
    return objects


def export_config(*, include_secrets: bool = False) -> str:
    """The whole registry as YAML, one mapping per object, ordered by name."""
    document: dict[str, list[dict[str, Any]]] = {}
    unreadable = []
    for section in SECTIONS.values():
        entries = []
        for obj in _objects(section):
            entry = {}
            for key in section.fields:
                value = _file_value(section, obj, key)
                if include_secrets and isinstance(value, UndecryptableSecret):
                    unreadable.append(f"{section.noun} {obj.name!r}: field {key!r} {value.reason}")
                if not _omitted(section, key, value):
                    entry[key] = value if include_secrets else _mask(section, key, value)
            entries.append(entry)
        document[section.key] = entries
    if unreadable:
        raise ConfigError(unreadable)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _load(text: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"]) from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(["the file must be a mapping with lists nodes, destinations, rules, hl7_senders"])
    unknown = sorted(set(document) - set(SECTIONS) - set(RESERVED))
    if unknown:
        raise ConfigError([f"unknown top-level key {key!r}" for key in unknown])
    return document


@dataclass
class Plan:
    """What one section of the file will do, and the objects every later section may refer to by name."""

    section: Section
    changes: list[Change] = field(default_factory=list)
    to_save: list[models.Model] = field(default_factory=list)
    links: dict[int, dict[str, list[models.Model]]] = field(default_factory=dict)  # id(obj) -> m2m targets
    errors: list[str] = field(default_factory=list)
    final: dict[str, models.Model] = field(default_factory=dict)  # name -> object, once applied
    deleted: list[str] = field(default_factory=list)


def _assign(section: Section, obj: models.Model, key: str, value: Any, final: dict, plan: Plan) -> list[str]:
    """Set one field from the file onto the object; returns problems with the value."""
    if key in section.checks:
        problems = section.checks[key](value)
        if problems:
            return problems
    if key in section.refs:
        target = final[section.refs[key]].get(value) if value is not None else None
        if value is not None and target is None:
            return [f"no {section.refs[key]._meta.verbose_name} named {value!r}"]
        setattr(obj, key, target)
        return []
    if key in section.many:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            return ["must be a list of names"]
        missing = [name for name in value if name not in final[section.many[key]]]
        if missing:
            return [f"no {section.many[key]._meta.verbose_name} named {name!r}" for name in missing]
        plan.links.setdefault(id(obj), {})[key] = [final[section.many[key]][name] for name in value]
        return []
    if key in section.secrets and value == SECRET_MASK:
        if not getattr(obj, key):
            return [f'"{SECRET_MASK}" keeps the current secret, but there is none: give the value']
        return []
    model_field = section.model._meta.get_field(section.attr(key))
    if value is None and isinstance(model_field, models.CharField | models.TextField) and not model_field.null:
        value = ""
    setattr(obj, section.attr(key), value)
    return []


def _plan_section(section: Section, entries: Any, final: dict[type, dict[str, models.Model]]) -> Plan:
    """Validate one section against the database and the sections before it."""
    plan = Plan(section)
    if not isinstance(entries, list):
        plan.errors.append(f"{section.key}: must be a list")
        return plan
    existing = {obj.name: obj for obj in _objects(section)}
    for index, entry in enumerate(entries):
        _plan_entry(plan, index, entry, existing, final)
    plan.deleted = sorted(set(existing) - set(plan.final))
    if plan.deleted and section.undeletable:
        plan.errors.extend(section.undeletable(plan.deleted))
    plan.changes.extend(Change("delete", section.noun, name) for name in plan.deleted)
    final[section.model] = plan.final
    return plan


def _plan_entry(plan: Plan, index: int, entry: Any, existing: dict, final: dict) -> None:
    """One object of the file: checked, set onto its (new or existing) object, and diffed."""
    section = plan.section
    if not isinstance(entry, dict):
        plan.errors.append(f"{section.key}[{index}]: must be a mapping")
        return
    name = entry.get("name")
    label = f"{section.noun} {name!r}" if name else f"{section.key}[{index}]"
    bad = [f"{label}: unknown field {key!r}" for key in entry if key not in section.fields]
    bad += [f"{label}: missing field {key!r}" for key in section.required if key not in entry]
    if name in plan.final:
        bad.append(f"{label}: name appears twice")
    if bad:
        plan.errors.extend(bad)
        return
    obj = existing.get(name) or section.model()
    plan.final[name] = obj
    before = {key: _file_value(section, obj, key) for key in section.fields}
    problems = [
        f"{label}: field {key!r}: {problem}"
        for key, value in entry.items()
        for problem in _assign(section, obj, key, value, final, plan)
    ]
    problems += _clean(section, obj, label, entry)
    if problems:
        plan.errors.extend(problems)
        return
    after = {key: _after(section, obj, key, plan) for key in section.fields}
    if obj.pk is None:
        shown = {k: (None, _mask(section, k, v)) for k, v in after.items() if not _omitted(section, k, v)}
        plan.changes.append(Change("create", section.noun, name, shown))
        plan.to_save.append(obj)
        return
    diff = {
        k: (_mask(section, k, before[k]), _mask(section, k, after[k])) for k in section.fields if before[k] != after[k]
    }
    if diff:
        plan.changes.append(Change("update", section.noun, name, diff))
        plan.to_save.append(obj)


def _after(section: Section, obj: models.Model, key: str, plan: Plan) -> Any:
    if key in section.many and key in plan.links.get(id(obj), {}):
        return sorted(target.name for target in plan.links[id(obj)][key])
    return _file_value(section, obj, key)


def _mask(section: Section, key: str, value: Any) -> Any:
    """Values as the diff prints them: secrets never appear."""
    return SECRET_MASK if key in section.secrets and value else value


def _omitted(section: Section, key: str, value: Any) -> bool:
    return section.omit_blank and _is_blank(value) and key not in section.required


def _clean(section: Section, obj: models.Model, label: str, entry: dict) -> list[str]:
    """Model validation; a reference to an object this file creates is not an error for being unsaved yet."""
    try:
        obj.full_clean(validate_unique=False, exclude=[*section.refs, *section.many])
    except ValidationError as exc:
        pending_refs = {key for key in section.refs if entry.get(key) is not None}
        return [
            f"{label}: field {key!r}: {' '.join(msgs)}"
            for key, msgs in exc.message_dict.items()
            if key not in pending_refs
        ]
    return []


def _dangling(plans: dict[str, Plan]) -> list[str]:
    """Objects the file deletes that sections absent from the file still use."""
    errors = []
    for section in SECTIONS.values():
        if section.key in plans:
            continue
        for key, model in {**section.refs, **section.many}.items():
            deleted = next((p.deleted for p in plans.values() if p.section.model is model), [])
            if not deleted:
                continue
            users = section.model.objects.filter(**{f"{key}__name__in": deleted}).values_list("name", f"{key}__name")
            for user, target in users.distinct():
                noun = model._meta.verbose_name
                errors.append(f"{noun} {target!r}: still used by {section.noun} {user!r}; change or list that too")
    return errors


def import_config(text: str, *, dry_run: bool = False) -> list[Change]:
    """Apply a configuration file, all or nothing; returns the changes (made, or that would be)."""
    document = _load(text)
    final: dict[type, dict[str, models.Model]] = {}
    plans: dict[str, Plan] = {}
    for key, section in SECTIONS.items():
        if key in document:
            plans[key] = _plan_section(section, document[key], final)
        else:
            final[section.model] = {obj.name: obj for obj in section.model.objects.all()}
    errors = [error for plan in plans.values() for error in plan.errors] + _dangling(plans)
    if errors:
        raise ConfigError(errors)
    if not dry_run:
        _apply(list(plans.values()))
    return [change for plan in plans.values() for change in plan.changes]


def _apply(plans: list[Plan]) -> None:
    with transaction.atomic():
        for plan in reversed(plans):  # rules, then destinations, then nodes: nothing is deleted while used
            if plan.section.delete:
                plan.section.delete(plan.deleted)
            else:
                plan.section.model.objects.filter(name__in=plan.deleted).delete()
        for plan in plans:
            for obj in plan.to_save:
                obj.save()  # Django takes a reference's id from the object saved just before
            for obj in plan.to_save:
                for key, targets in plan.links.get(id(obj), {}).items():
                    getattr(obj, key).set(targets)
