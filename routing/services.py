"""Forward jobs: claim a batch, deliver it, record each instance's result; retry, redrive, cancel, pause.

The ForwardJob row is the truth. A delivery claims up to `batch_size` due jobs
of one study for one destination under a lease and a batch token; results
are written only while the token still holds the job, so a delivery that lost
its lease (a worker stalled past it) cannot overwrite a newer one's work.
Claims of one destination are serialised by a row lock on it, which is what
makes `max_concurrency` (distinct live batch tokens) exact across workers.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from gateway import store
from gateway.models import Instance
from routing import metrics, outbox
from routing.delivery import DEAD, DELIVERED, RETRY, DeliveryError, Item, Result
from routing.leases import LeaseHeartbeat, lease
from routing.models import DeliveryAttempt, Destination, ForwardJob
from routing.ratelimit import Pacer

log = logging.getLogger("isthmus.routing")

State = ForwardJob.State
SWEEP_LIMIT = 5000  # due jobs re-rung per sweep; the next sweep takes the rest


@dataclass
class Claim:
    """A leased batch: the jobs this delivery holds under `token`."""

    token: str
    destination: Destination
    items: list[Item]
    missing: list[int]  # jobs whose stored file is gone
    jobs: dict[int, tuple[int, datetime, int]] = field(default_factory=dict)  # id -> (attempts, created_at, size)
    started: float = field(default_factory=time.monotonic)


def _claimable(now: datetime) -> QuerySet:
    """Pending, due, and not held by a live delivery (a sweep's doorbell lease has a blank token)."""
    free = Q(lease_until__isnull=True) | Q(lease_until__lte=now) | Q(batch="")
    return ForwardJob.objects.filter(free, state=State.PENDING, next_attempt_at__lte=now)


def active_batches(destination_id: int, now: datetime | None = None) -> int:
    """Deliveries of this destination under way (distinct live batch tokens)."""
    live = ForwardJob.objects.filter(
        destination_id=destination_id, state=State.PENDING, lease_until__gt=now or timezone.now()
    ).exclude(batch="")
    return live.values("batch").distinct().count()


def claim_batch(destination_id: int, study_uid: str) -> Claim | None:
    """Lease up to batch_size due jobs of one study; None when paused, at max concurrency, or nothing is due."""
    now, token = timezone.now(), uuid.uuid4().hex
    with transaction.atomic():
        # A no-op UPDATE locks the row (PostgreSQL) or the database (SQLite) until commit.
        if not Destination.objects.filter(pk=destination_id).update(paused=F("paused")):
            return None
        destination = Destination.objects.select_related("node").get(pk=destination_id)
        if not destination.enabled or destination.paused:
            return None
        if active_batches(destination_id, now) >= destination.max_concurrency:
            return None
        due = _claimable(now).filter(destination_id=destination_id, study_instance_uid=study_uid).order_by("pk")
        if connection.features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True)
        ids = list(due.values_list("pk", flat=True)[: destination.batch_size])
        if not ids:
            return None
        # Conditional: on SQLite (no row locks) a job another process took meanwhile is not taken twice.
        _claimable(now).filter(pk__in=ids).update(batch=token, lease_until=now + lease(), attempts=F("attempts") + 1)
    return _load_claim(token, destination)


def _load_claim(token: str, destination: Destination) -> Claim | None:
    claim = Claim(token=token, destination=destination, items=[], missing=[])
    jobs = ForwardJob.objects.filter(batch=token, state=State.PENDING).select_related("instance").order_by("pk")
    for job in jobs:
        claim.jobs[job.pk] = (job.attempts, job.created_at, job.size)
        instance = job.instance
        try:
            path = store.instance_path(instance)
        except ValueError:
            path = None
        if path is None or not path.is_file():
            claim.missing.append(job.pk)
            continue
        claim.items.append(
            Item(
                job_id=job.pk,
                path=path,
                sop_class_uid=instance.sop_class_uid,
                sop_instance_uid=instance.sop_instance_uid,
                transfer_syntax_uid=instance.transfer_syntax_uid,
                size=instance.size,
            )
        )
    return claim if claim.jobs else None


def retry_delay(destination: Destination, attempts: int) -> float:
    """Seconds before the next attempt after the `attempts`-th failure: exponential, capped, 25 % jitter."""
    seconds = destination.retry_first_delay * destination.retry_multiplier ** max(0, attempts - 1)
    return min(destination.retry_max_delay, seconds) * random.uniform(0.75, 1.0)


class Recorder:
    """Collects a batch's per-instance results; writes them every lease/3 and at the end (LeaseHeartbeat renews)."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.results: dict[int, Result] = {}
        self.unsaved: list[Result] = []
        self.saved_at = time.monotonic()
        self.delivered = 0

    def add(self, result: Result) -> None:
        if result.job_id in self.results or result.job_id not in self.claim.jobs:
            return
        self.results[result.job_id] = result
        self.unsaved.append(result)
        if time.monotonic() - self.saved_at > settings.ROUTING_LEASE_SECONDS / 3:
            self.flush()

    def fail_rest(self, error: DeliveryError) -> None:
        outcome = DEAD if error.permanent else RETRY
        for job_id in self.claim.jobs:
            self.add(Result(job_id, outcome, error.status, str(error)[:1000], error.retry_after))

    def flush(self) -> None:
        results, self.unsaved = self.unsaved, []
        self.saved_at = time.monotonic()
        if results:
            self.delivered += record_results(self.claim, results)


def record_results(claim: Claim, results: list[Result]) -> int:
    """Write results of jobs this claim still holds: delivered, rescheduled with backoff, or dead; returns delivered."""
    now, destination = timezone.now(), claim.destination
    held = ForwardJob.objects.filter(batch=claim.token, state=State.PENDING)
    seconds = time.monotonic() - claim.started
    attempts, failures, delivered = [], [], []
    with transaction.atomic():
        for result in results:
            outcome, error = _final_outcome(claim, result, now)
            attempts.append(_attempt(claim, result, outcome, error, now, seconds))
            if outcome == DELIVERED:
                delivered.append(result.job_id)
            else:
                failures.append((result, outcome, error))
        done = held.filter(pk__in=delivered).update(
            state=State.DELIVERED, delivered_at=now, lease_until=None, batch="", last_error=""
        )
        _reschedule(claim, held, failures, now)
        DeliveryAttempt.objects.bulk_create(attempts)
        _note_destination(destination, delivered, failures, now)
    _count(claim, delivered, failures, now)
    return done


def _count(claim: Claim, delivered: list[int], failures: list, now: datetime) -> None:
    name = claim.destination.name
    for job_id in delivered:
        _attempts, created_at, size = claim.jobs[job_id]
        metrics.record_delivered(name, latency_seconds=(now - created_at).total_seconds(), size=size)
    for outcome in (RETRY, DEAD):
        count = sum(1 for _, final, _ in failures if final == outcome)
        if count:
            metrics.record_outcome(name, outcome, count=count)


def _reschedule(claim: Claim, held: QuerySet, failures: list, now: datetime) -> None:
    """Dead jobs keep their reason; the others wait out the backoff, one jitter per batch so it retries together."""
    groups: dict[tuple, list[int]] = {}
    delays: dict[int, float] = {}
    for result, outcome, error in failures:
        if outcome == DEAD:
            key = (DEAD, error, None)
        else:
            tries = claim.jobs[result.job_id][0]
            delay = delays.setdefault(tries, retry_delay(claim.destination, tries))
            # The peer's Retry-After is honoured up to the longest wait the destination allows, no further.
            asked = min(result.retry_after or 0.0, claim.destination.retry_max_delay)
            key = (RETRY, error, now + timedelta(seconds=max(delay, asked)))
        groups.setdefault(key, []).append(result.job_id)
    for (outcome, error, next_attempt_at), ids in groups.items():
        fields = {"lease_until": None, "batch": "", "last_error": error}
        if outcome == DEAD:
            fields["state"] = State.DEAD
        else:
            fields["next_attempt_at"] = next_attempt_at
        held.filter(pk__in=ids).update(**fields)


def _final_outcome(claim: Claim, result: Result, now: datetime) -> tuple[str, str]:
    """A transient failure becomes dead once the retry policy is exhausted (attempts or age)."""
    destination = claim.destination
    error = result.error[:1000]
    if result.outcome != RETRY:
        return result.outcome, error
    attempts, created_at, _size = claim.jobs[result.job_id]
    if attempts >= destination.retry_attempts:
        return DEAD, f"gave up after {attempts} attempts: {error}"[:1000]
    if (now - created_at).total_seconds() >= destination.retry_max_age:
        return DEAD, f"gave up after {destination.retry_max_age:g} s (retry maximum age): {error}"[:1000]
    return RETRY, error


def _attempt(claim: Claim, result: Result, outcome: str, error: str, now: datetime, seconds: float):
    return DeliveryAttempt(
        job_id=result.job_id,
        destination_id=claim.destination.pk,
        at=now,
        outcome=outcome,
        status=result.status[:16],
        error=error,
        seconds=seconds,
    )


def _note_destination(destination: Destination, delivered: list, failures: list, now: datetime) -> None:
    fields: dict = {}
    if delivered:
        fields["last_success_at"] = now
    if failures:
        fields["last_error"] = failures[-1][2]
        fields["last_error_at"] = now
        for result, outcome, error in failures:
            log.warning("forward job %s to %s: %s (%s)", result.job_id, destination.name, outcome, error)
    if fields:  # update(), not save(): updated_at is the rules cache's version
        Destination.objects.filter(pk=destination.pk).update(**fields)


# --- One delivery ---------------------------------------------------------------------------


def deliver(destination_id: int, study_uid: str) -> int:
    """Claim and deliver one batch of this study to this destination; returns how many instances arrived."""
    claim = claim_batch(destination_id, study_uid)
    if claim is None:
        return 0
    recorder = Recorder(claim)
    for job_id in claim.missing:
        recorder.add(Result(job_id, DEAD, error="the stored file is missing"))
    destination = claim.destination
    pacer = Pacer(
        instances_per_second=destination.rate_instances,
        mbytes_per_second=destination.rate_mbytes,
        share=destination.max_concurrency,
    )
    try:
        with LeaseHeartbeat(claim.token):
            if claim.items:
                _sender(destination)(destination, claim.items, recorder.add, pacer)
            pacer.finish()  # hold the slot for this batch's share of the rate
    except DeliveryError as error:
        recorder.fail_rest(error)
    except Exception as exc:  # a bug or a library surprise: the jobs retry, nothing is lost
        log.exception("delivery to %s failed unexpectedly", destination.name)
        recorder.fail_rest(DeliveryError(f"{type(exc).__name__}: {exc}"))
    recorder.fail_rest(DeliveryError("no answer for this instance"))  # only those without a result
    recorder.flush()
    log.info("study %s to %s: %d of %d delivered", study_uid, destination.name, recorder.delivered, len(claim.jobs))
    ring_due(destination_id)
    return recorder.delivered


def _sender(destination: Destination):
    from routing.delivery import dimse, stow

    return dimse.send_batch if destination.kind == Destination.Kind.DIMSE else stow.send_batch


def ring_due(destination_id: int) -> int:
    """Ring for due, unheld studies of a destination, up to its free concurrency; returns how many."""
    destination = Destination.objects.filter(pk=destination_id, enabled=True, paused=False).first()
    if destination is None:
        return 0
    now = timezone.now()
    free = destination.max_concurrency - active_batches(destination_id, now)
    if free <= 0:
        return 0
    due = _claimable(now).filter(destination_id=destination_id).order_by("next_attempt_at")
    studies = list(dict.fromkeys(due.values_list("study_instance_uid", flat=True)[: 50 * free]))[:free]
    for study_uid in studies:
        outbox.ring(destination_id, study_uid)
    return len(studies)


def sweep() -> int:
    """Beat: re-ring every due job whose lease ran out (a lost doorbell, a dead worker); returns doorbells rung.

    The rung jobs get a doorbell lease (blank token) of three sweep periods, so a
    slow queue is not flooded with the same doorbell; deliveries may still claim them.
    """
    now = timezone.now()
    with transaction.atomic():
        due = ForwardJob.objects.filter(
            Q(lease_until__isnull=True) | Q(lease_until__lte=now),
            state=State.PENDING,
            next_attempt_at__lte=now,
            destination__enabled=True,
            destination__paused=False,
        ).order_by("next_attempt_at")
        if connection.features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True, of=("self",))
        rows = list(due.values_list("pk", "destination_id", "study_instance_uid")[:SWEEP_LIMIT])
        ids = [pk for pk, _, _ in rows]
        for start in range(0, len(ids), 500):
            ForwardJob.objects.filter(pk__in=ids[start : start + 500]).update(
                lease_until=now + timedelta(seconds=3 * settings.ROUTING_SWEEP_SECONDS), batch=""
            )
    pairs = list(dict.fromkeys((destination_id, study) for _, destination_id, study in rows))
    for destination_id, study_uid in pairs:
        outbox.ring(destination_id, study_uid)
    if pairs:
        log.info("sweep re-rang %d (destination, study) pair(s) for %d due job(s)", len(pairs), len(ids))
    return len(pairs)


# --- Operators' actions (admin, API) --------------------------------------------------------------


def _ids(jobs: QuerySet | Iterable[int]) -> list[int]:
    if isinstance(jobs, QuerySet):
        return list(jobs.values_list("pk", flat=True))
    return [int(pk) for pk in jobs]


def _ring_on_commit(job_ids: list[int]) -> None:
    pairs = set(ForwardJob.objects.filter(pk__in=job_ids).values_list("destination_id", "study_instance_uid"))
    for destination_id, study_uid in pairs:
        transaction.on_commit(lambda d=destination_id, s=study_uid: outbox.ring(d, s))


def retry_jobs(jobs: QuerySet | Iterable[int]) -> int:
    """Pending or dead jobs are due now with a fresh retry policy (attempts and age count from here)."""
    ids, now = _ids(jobs), timezone.now()
    with transaction.atomic():
        count = 0
        for start in range(0, len(ids), 500):
            chunk = ForwardJob.objects.filter(pk__in=ids[start : start + 500], state__in=[State.PENDING, State.DEAD])
            in_flight = Q(lease_until__gt=now) & ~Q(batch="")  # let that delivery finish
            count += chunk.exclude(in_flight).update(
                state=State.PENDING, attempts=0, created_at=now, next_attempt_at=now, lease_until=None, batch=""
            )
        _ring_on_commit(ids)
    return count


def redrive_dead(destination: Destination) -> int:
    """Every dead job of a destination gets another full retry policy."""
    return retry_jobs(ForwardJob.objects.filter(destination=destination, state=State.DEAD))


def cancel_jobs(ids: QuerySet | Iterable[int]) -> int:
    """Pending or dead jobs are not delivered (an in-flight batch cannot record over a cancel)."""
    ids = _ids(ids)
    count = 0
    for start in range(0, len(ids), 500):
        count += ForwardJob.objects.filter(
            pk__in=ids[start : start + 500], state__in=[State.PENDING, State.DEAD]
        ).update(state=State.CANCELLED, lease_until=None, batch="")
    return count


def set_paused(destination: Destination, paused: bool) -> None:
    """Pause keeps jobs queued without delivering; resuming rings the due ones at once."""
    destination.paused = paused
    destination.save(update_fields=["paused", "updated_at"])
    if not paused:
        transaction.on_commit(lambda: ring_due(destination.pk))


def send_study(study_uid: str, destination: Destination) -> int:
    """Owe a whole stored study to a destination (manual send); instances already pending there are skipped."""
    now = timezone.now()
    owed = ForwardJob.objects.filter(destination=destination, state=State.PENDING).values("instance_id")
    instances = Instance.objects.filter(series__study__study_instance_uid=study_uid).exclude(pk__in=owed)
    jobs = [
        ForwardJob(
            instance_id=pk,
            destination=destination,
            study_instance_uid=study_uid,
            size=size,
            next_attempt_at=now,
            created_at=now,
        )
        for pk, size in instances.values_list("pk", "size")
    ]
    with transaction.atomic():
        ForwardJob.objects.bulk_create(jobs, batch_size=500)
        if jobs:
            transaction.on_commit(lambda: outbox.ring(destination.pk, study_uid))
    return len(jobs)


def verify_destination(destination: Destination) -> tuple[bool, str]:
    """The Verify action: C-ECHO to a DIMSE node, a QIDO-RS request to a DICOMweb service."""
    if destination.kind == Destination.Kind.DIMSE:
        from gateway.dimse.echo import echo

        node = destination.node
        if node is None:
            return False, "no node"
        result = echo(host=node.host, port=node.port, ae_title=node.ae_title)
        return result.ok, str(result)
    from routing.delivery import stow

    return stow.verify(destination)
