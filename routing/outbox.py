"""The outbox: ForwardJob rows written inside store.save()'s index transaction.

store.save() calls `tags()` to know which extra attributes to read from each
file's header (those the rules' conditions name) and `write_jobs()` once the
instance row exists, in the same transaction, so that an acknowledged
instance always has its jobs. Jobs are enqueued when the transaction commits.

The store path is hot (C-STORE rate is benchmarked), so the enabled rules are
compiled once per process and re-read only when their version (max
updated_at and counts of rules, destinations and rule-destination links)
changed, checked at most every ISTHMUS_ROUTING_RULES_RELOAD_SECONDS. Saves in
this process invalidate at once through signals. With no rules, write_jobs
costs a dictionary lookup.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.utils import timezone

from gateway.indexing import HEADER_TAGS
from routing import rules as rule_matching
from routing.models import Destination, ForwardJob, Rule

if TYPE_CHECKING:
    from gateway.models import Instance
    from gateway.store import Received

log = logging.getLogger("isthmus.routing")


@dataclass(frozen=True)
class _Routing:
    version: tuple
    rules: tuple[rule_matching.CompiledRule, ...]
    keywords: tuple[str, ...]  # every keyword some condition names
    tags: tuple[int, ...]  # those the index does not already read


_EMPTY = _Routing(version=(), rules=(), keywords=(), tags=())
_state = {"routing": _EMPTY, "checked_at": float("-inf")}
_lock = threading.Lock()


def invalidate(**_kwargs) -> None:
    """Forget the cached rules (signal receiver: a rule or destination changed in this process)."""
    _state["checked_at"] = float("-inf")


for _model in (Rule, Destination):
    post_save.connect(invalidate, sender=_model, dispatch_uid=f"routing-invalidate-save-{_model.__name__}")
    post_delete.connect(invalidate, sender=_model, dispatch_uid=f"routing-invalidate-delete-{_model.__name__}")
m2m_changed.connect(invalidate, sender=Rule.destinations.through, dispatch_uid="routing-invalidate-m2m")


def current() -> _Routing:
    """The compiled enabled rules, re-read when their version changed (checked at most once a period)."""
    now = time.monotonic()
    if now - _state["checked_at"] < settings.ROUTING_RULES_RELOAD_SECONDS:
        return _state["routing"]
    with _lock:
        if now - _state["checked_at"] < settings.ROUTING_RULES_RELOAD_SECONDS:
            return _state["routing"]
        version = _version()
        if version != _state["routing"].version:
            _state["routing"] = _load(version)
        _state["checked_at"] = time.monotonic()
    return _state["routing"]


def _version() -> tuple:
    rules = Rule.objects.aggregate(n=Count("pk"), at=Max("updated_at"))
    destinations = Destination.objects.aggregate(n=Count("pk"), at=Max("updated_at"))
    links = Rule.destinations.through.objects.count()
    return (rules["n"], rules["at"], destinations["n"], destinations["at"], links)


def _load(version: tuple) -> _Routing:
    compiled = []
    for rule in Rule.objects.filter(enabled=True).prefetch_related("destinations").order_by("order", "name"):
        try:
            conditions = rule_matching.compile_conditions(rule.conditions or {})
        except rule_matching.InvalidCondition as exc:
            log.error("rule %s is skipped: %s", rule.name, exc)
            continue
        destination_ids = tuple(d.pk for d in rule.destinations.all() if d.enabled)
        compiled.append(
            rule_matching.CompiledRule(rule.pk, rule.name, rule.is_default, rule.stop, destination_ids, conditions)
        )
    keywords = tuple(dict.fromkeys(keyword for rule in compiled for keyword, _ in rule.conditions))
    tags = tuple(
        tag
        for keyword in keywords
        if (tag := rule_matching.keyword_tag(keyword)) is not None and tag not in HEADER_TAGS
    )
    return _Routing(version=version, rules=tuple(compiled), keywords=keywords, tags=tags)


def tags() -> tuple[int, ...]:
    """Tags the enabled rules' conditions need beyond indexing.HEADER_TAGS."""
    return current().tags


def write_jobs(instance: Instance, received: Received) -> int:
    """Evaluate the rules for one stored instance and write its ForwardJobs; returns how many."""
    routing = current()
    if not routing.rules:
        return 0
    values = rule_matching.instance_values(
        received.header.dataset, routing.keywords, calling_ae=received.calling_ae, called_ae=received.called_ae
    )
    selected = rule_matching.select(routing.rules, values)
    if not selected:
        return 0
    now = timezone.now()
    ForwardJob.objects.bulk_create(
        ForwardJob(
            instance=instance,
            destination_id=destination_id,
            rule_id=rule_id,
            study_instance_uid=received.study_uid,
            size=received.size,
            next_attempt_at=now,
            created_at=now,
        )
        for rule_id, destination_id in selected
    )
    for _rule_id, destination_id in selected:
        transaction.on_commit(lambda d=destination_id: ring(d, received.study_uid))
    return len(selected)


# --- Doorbells ---------------------------------------------------------------------------
# A study arrives as many instances in a burst; one doorbell per (destination, study) per
# window is enough, as long as one more rings after the last commit of the burst (trailing edge).
_rung: dict[tuple[int, str], float] = {}
_trailing: set[tuple[int, str]] = set()
_ring_lock = threading.Lock()


def ring(destination_id: int, study_uid: str) -> None:
    """Ask a worker to deliver this study now; debounced, and harmless if lost (the sweep re-rings)."""
    key = (destination_id, study_uid)
    now = time.monotonic()
    with _ring_lock:
        if len(_rung) > 10_000:
            _rung.clear()
        elapsed = now - _rung.get(key, float("-inf"))
        window = settings.ROUTING_RING_WINDOW_SECONDS
        if elapsed >= window:
            _rung[key] = now
            delay = None
        elif key in _trailing:
            return
        else:
            _trailing.add(key)
            delay = window - elapsed
    if delay is None:
        _send(destination_id, study_uid)
        return
    timer = threading.Timer(delay, _trailing_ring, args=(key,))
    timer.daemon = True
    timer.start()


def _trailing_ring(key: tuple[int, str]) -> None:
    with _ring_lock:
        _trailing.discard(key)
        _rung[key] = time.monotonic()
    _send(*key)


def _send(destination_id: int, study_uid: str) -> None:
    from routing.tasks import deliver

    try:
        deliver.delay(destination_id, study_uid)
    except Exception as exc:  # broker down: the job is due, the sweep delivers it
        log.warning("delivery of study %s to destination %s not queued (%s); the sweep will", study_uid,
                    destination_id, exc)  # fmt: skip
