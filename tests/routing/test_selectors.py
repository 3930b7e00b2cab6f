"""Per-destination figures (routing.selectors): right numbers, in a fixed number of queries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from routing import selectors
from routing.models import DeliveryAttempt, ForwardJob
from tests.routing.operator_data import attempt, dimse_destination, job, study_with_instances

pytestmark = pytest.mark.django_db
State, Outcome = ForwardJob.State, DeliveryAttempt.Outcome


@pytest.fixture
def queues():
    """pacs: 2 pending (oldest 20 min), 1 dead, 1 delivered, 1 cancelled; archive: only history; idle: nothing."""
    now = timezone.now()
    pacs, archive, idle = dimse_destination("pacs"), dimse_destination("archive"), dimse_destination("idle")
    _, instances = study_with_instances(1, 5)
    job(pacs, instances[0], State.PENDING, age=timedelta(minutes=20), attempts=3)
    job(pacs, instances[1], State.PENDING, age=timedelta(minutes=2))
    dead = job(pacs, instances[2], State.DEAD, age=timedelta(days=2), attempts=20)
    delivered = job(pacs, instances[3], State.DELIVERED, age=timedelta(minutes=50))
    job(pacs, instances[4], State.CANCELLED, age=timedelta(hours=5))
    attempt(delivered, Outcome.RETRY, at=now - timedelta(minutes=45), error="connection refused")
    attempt(delivered, Outcome.DELIVERED, at=now - timedelta(minutes=40))
    attempt(dead, Outcome.DEAD, at=now - timedelta(hours=3))
    attempt(dead, Outcome.RETRY, at=now - timedelta(days=2))  # outside the day
    archived = job(archive, instances[0], State.DELIVERED, age=timedelta(hours=6))
    for hours in (2, 5, 23):
        attempt(archived, Outcome.DELIVERED, at=now - timedelta(hours=hours))
    return pacs, archive, idle


def test_destination_stats_counts_backlog_and_outcomes_per_destination(queues):
    pacs, archive, idle = queues
    stats = {s.destination.name: s for s in selectors.destination_stats()}
    assert list(stats) == ["archive", "idle", "pacs"]
    p = stats["pacs"]
    assert (p.pending, p.dead) == (2, 1)
    assert 19 * 60 < p.oldest_age_seconds < 21 * 60
    assert (p.delivered_1h, p.failed_1h, p.delivered_24h, p.failed_24h) == (1, 1, 1, 2)
    a = stats["archive"]
    assert (a.pending, a.dead, a.oldest_pending_at, a.oldest_age_seconds) == (0, 0, None, 0.0)
    assert (a.delivered_1h, a.delivered_24h, a.failed_24h) == (0, 3, 0)
    i = stats["idle"]
    assert (i.pending, i.delivered_24h, i.failed_24h) == (0, 0, 0)


def test_destination_stats_takes_three_queries_however_many_destinations(queues, django_assert_num_queries):
    with django_assert_num_queries(3):
        stats = selectors.destination_stats()
        assert [s.destination.node.ae_title for s in stats]  # the node comes with the destination
    for number in range(10):
        dimse_destination(f"more-{number}")
    with django_assert_num_queries(3):
        assert len(selectors.destination_stats()) == 13


def test_overdue_backlogs_names_destinations_waiting_past_the_threshold(queues):
    overdue = selectors.overdue_backlogs(threshold_seconds=600)
    assert [(o["destination"], o["pending"]) for o in overdue] == [("pacs", 2)]
    assert overdue[0]["oldest_age_seconds"] > 1190
    assert selectors.overdue_backlogs(threshold_seconds=3600) == []


def test_backlogs_by_name_lists_every_destination_for_the_gauges(queues, django_assert_num_queries):
    with django_assert_num_queries(2):
        figures = selectors.destination_backlogs_by_name()
    assert figures["archive"] == (0, 0, 0.0) and figures["idle"] == (0, 0, 0.0)
    pending, dead, age = figures["pacs"]
    assert (pending, dead) == (2, 1) and 19 * 60 < age < 21 * 60
