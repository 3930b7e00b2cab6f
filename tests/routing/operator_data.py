"""Rows for the operators' view tests: destinations with jobs and attempts at known times."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone

from gateway.models import Instance, Node, Study
from routing.models import DeliveryAttempt, Destination, ForwardJob
from tests.gateway.test_admin_studies import make_study


def dimse_destination(name: str, *, port: int = 11112, **fields) -> Destination:
    node, _ = Node.objects.get_or_create(name=f"{name}-node", defaults={"ae_title": name.upper()[:16], "port": port,
                                                                         "host": "127.0.0.1"})  # fmt: skip
    return Destination.objects.create(name=name, kind=Destination.Kind.DIMSE, node=node, **fields)


def job(destination: Destination, instance: Instance, state: str, *, age: timedelta, **fields) -> ForwardJob:
    created = timezone.now() - age
    return ForwardJob.objects.create(
        instance=instance, destination=destination, study_instance_uid=instance.series.study.study_instance_uid,
        size=instance.size, state=state, next_attempt_at=created, created_at=created, **fields,
    )  # fmt: skip


def attempt(forward_job: ForwardJob, outcome: str, *, at: datetime, error: str = "") -> DeliveryAttempt:
    return DeliveryAttempt.objects.create(
        job=forward_job, destination=forward_job.destination, at=at, outcome=outcome, error=error
    )


def study_with_instances(number: int, count: int) -> tuple[Study, list[Instance]]:
    study = make_study(number, ("CT",), per_series=count, size=1000)
    return study, list(Instance.objects.filter(series__study=study).order_by("instance_number"))


def stow_destination_form(destination: Destination, **fields) -> dict:
    """The admin change form of a bearer-token STOW-RS destination, secrets left blank (kept as stored)."""
    form = {
        "name": destination.name, "kind": "dicomweb", "enabled": "on", "url": destination.url, "auth": "bearer",
        "token": "", "password": "", "oauth_client_secret": "", "verify_tls": "on", "connect_timeout": 10,
        "read_timeout": 120, "max_concurrency": 2, "batch_size": 50, "retry_attempts": 20, "retry_first_delay": 5,
        "retry_multiplier": 2, "retry_max_delay": 600, "retry_max_age": 604800,
    }  # fmt: skip
    return {**form, **fields}
