"""STOW-RS answers read per instance; transient and permanent failures; rate limit and concurrency, seen by the server."""

from __future__ import annotations

import email.utils
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone
from pydicom.uid import generate_uid

from gateway import store
from routing import services
from routing.models import DeliveryAttempt, ForwardJob
from tests.conftest import free_port
from tests.gateway.instances import make_instance, sop_uid_of
from tests.routing.conftest import drain, rule, states, stow_destination
from tests.routing.stow_server import StowServer, accept_all


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    server = StowServer(free_port()).start()
    yield server
    server.stop()


def receive(folder, study_uid: str | None = None, count: int = 5) -> list[str]:
    """Store `count` instances of one study the way every receiver does; returns their SOP Instance UIDs."""
    study_uid = study_uid or generate_uid()
    uids = []
    for _ in range(count):
        path = make_instance("CT_small.dcm", folder, study_uid=study_uid)
        with open(path, "rb") as stream:
            assert store.save(source=stream, calling_ae="CT1").ok
        uids.append(sop_uid_of(path))
    return uids


def test_one_rejected_instance_goes_dead_alone(storage, rings, stow_server, tmp_path):
    rule("cloud", {}, stow_destination(stow_server.url, batch_size=10))
    uids = receive(tmp_path / "in", count=5)
    bad = uids[2]
    stow_server.script = lambda _n, sent: (202, {}, {uid: 0xA900 if uid == bad else None for uid in sent})

    drain()

    assert len(stow_server.requests) == 1 and sorted(stow_server.received) == sorted(uids)  # one request, no resend
    assert states() == {"delivered": 4, "dead": 1}
    dead = ForwardJob.objects.get(state="dead")
    assert dead.instance.sop_instance_uid == bad
    assert dead.last_error == "STOW-RS failure reason 0xA900"
    assert DeliveryAttempt.objects.get(job=dead).status == "202"


def test_transient_answers_retry_and_then_deliver(storage, rings, stow_server, tmp_path):
    destination = stow_destination(stow_server.url)
    rule("cloud", {}, destination)
    uids = receive(tmp_path / "in", count=3)
    answers = iter([(503, {}, {}), (429, {"Retry-After": "1"}, {})])
    stow_server.script = lambda n, sent: next(answers, None) or accept_all(n, sent)

    started = timezone.now()
    drain()

    assert states() == {"delivered": 3}
    assert len(stow_server.requests) == 3 and sorted(stow_server.requests[-1].sop_instance_uids) == sorted(uids)
    outcomes = list(DeliveryAttempt.objects.order_by("at", "pk").values_list("outcome", "status"))
    assert outcomes == [("retry", "503")] * 3 + [("retry", "429")] * 3 + [("delivered", "200")] * 3
    # Retry-After was honoured: the last request came at least a second after the 429.
    assert stow_server.requests[2].started - stow_server.requests[1].ended >= 0.9
    assert ForwardJob.objects.filter(attempts=3).count() == 3
    assert timezone.now() - started < timedelta(seconds=20)


def test_permanent_answer_and_exhausted_policy_go_to_dead_letter(storage, rings, stow_server, tmp_path):
    rule("cloud", {}, stow_destination(stow_server.url, retry_attempts=2))
    receive(tmp_path / "a", count=2)
    stow_server.script = lambda _n, sent: (400, {}, {})
    drain()
    assert states() == {"dead": 2}
    assert set(ForwardJob.objects.values_list("last_error", flat=True)) == {"STOW-RS answered HTTP 400"}

    ForwardJob.objects.all().delete()
    receive(tmp_path / "b", count=2)
    stow_server.script = lambda _n, sent: (503, {}, {})
    drain()
    assert states() == {"dead": 2}
    assert set(ForwardJob.objects.values_list("last_error", flat=True)) == {
        "gave up after 2 attempts: STOW-RS answered HTTP 503"
    }

    # The operator fixes the peer and redrives: delivered, each instance once more.
    stow_server.script = accept_all
    assert services.redrive_dead(ForwardJob.objects.first().destination) == 2
    drain()
    assert states() == {"delivered": 2}


def run_workers(count: int, timeout: float = 30.0) -> None:
    """`count` threads delivering due jobs at once, as that many worker processes would."""

    def work() -> None:
        try:
            drain(timeout)
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)


def test_max_concurrency_and_rate_limit_hold_at_the_destination(storage, rings, stow_server, tmp_path):
    rate = 20.0
    destination = stow_destination(stow_server.url, max_concurrency=2, batch_size=4, rate_instances=rate)
    rule("cloud", {}, destination)
    uids = [uid for _ in range(6) for uid in receive(tmp_path / "in", count=6)]  # 6 studies of 6
    stow_server.delay = 0.2

    run_workers(4)

    assert states() == {"delivered": 36} and sorted(stow_server.received) == sorted(uids)
    assert stow_server.max_in_flight == 2  # 4 workers, 6 studies, never more than 2 requests at once
    arrivals = sorted(t for request in stow_server.requests for t in request.part_times)
    assert len(arrivals) == 36
    # In any one-second window, no more than the rate plus each slot's first part.
    for index, start in enumerate(arrivals):
        in_window = sum(1 for t in arrivals[index:] if t < start + 1.0)
        assert in_window <= rate + destination.max_concurrency, (index, in_window)
    assert (arrivals[-1] - arrivals[0]) >= (36 - 2) / rate - 0.1


def test_authentication_kinds(storage, rings, stow_server, tmp_path):
    """HTTP basic, a static bearer token, and OAuth2 client credentials (token fetched once, then reused)."""
    destinations = [
        stow_destination(stow_server.url, "basic", auth="basic", username="isthmus", password="s3cret"),
        stow_destination(stow_server.url, "bearer", auth="bearer", token="static-token"),
        stow_destination(
            stow_server.url,
            "oauth",
            auth="oauth2",
            oauth_token_url=f"http://127.0.0.1:{stow_server.port}/token",
            oauth_client_id="client",
            oauth_client_secret="secret",
            oauth_scope="stow",
        ),
    ]
    for destination in destinations:
        rule(f"to-{destination.name}", {}, destination)
    receive(tmp_path / "a", count=1)
    receive(tmp_path / "b", count=1)

    drain()

    assert states() == {"delivered": 6}
    seen = sorted(request.authorization for request in stow_server.requests)
    assert seen == sorted(["Basic aXN0aG11czpzM2NyZXQ="] * 2 + ["Bearer static-token"] * 2 + ["Bearer token-1"] * 2)
    assert stow_server.token_requests == [("Basic Y2xpZW50OnNlY3JldA==", "grant_type=client_credentials&scope=stow")]


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize(
    "retry_after",
    ["999999999999", lambda: http_date(365 * 86400), "Fri, 31 Dec 9999 23:59:59 GMT"],
    ids=["twelve-digits", "date-in-a-year", "year-9999"],
)
def test_a_hostile_retry_after_waits_no_longer_than_the_destination_allows(
    storage, rings, stow_server, tmp_path, retry_after
):
    rule("cloud", {}, stow_destination(stow_server.url, retry_first_delay=0.2, retry_max_delay=2.0))
    receive(tmp_path / "in", count=2)
    header = retry_after() if callable(retry_after) else retry_after
    answers = iter([(503, {"Retry-After": header}, {})])
    stow_server.script = lambda n, sent: next(answers, None) or accept_all(n, sent)

    drain(timeout=15)

    assert states() == {"delivered": 2}
    waited = stow_server.requests[1].started - stow_server.requests[0].ended
    assert 1.0 <= waited < 5.0  # the cap (2 s, less jitter), not the year asked for
    assert "Retry-After" in DeliveryAttempt.objects.filter(outcome="retry").first().error


def test_retry_after_as_an_http_date_is_honoured(storage, rings, stow_server, tmp_path):
    rule("cloud", {}, stow_destination(stow_server.url, retry_first_delay=0.2, retry_max_delay=60.0))
    receive(tmp_path / "in", count=1)
    answers = iter([(429, {"Retry-After": http_date(3)}, {})])
    stow_server.script = lambda n, sent: next(answers, None) or accept_all(n, sent)

    drain(timeout=15)

    assert states() == {"delivered": 1}
    # An HTTP-date has whole seconds: 3 s ahead is 2-3 s after the answer, far above the 0.2 s backoff.
    assert stow_server.requests[1].started - stow_server.requests[0].ended >= 1.5


@pytest.mark.parametrize("malformed", ["soon", "1.5e9", "inf", "2²"])
def test_a_malformed_retry_after_falls_back_to_the_backoff(storage, rings, stow_server, tmp_path, malformed):
    rule("cloud", {}, stow_destination(stow_server.url, retry_first_delay=0.2, retry_max_delay=60.0))
    receive(tmp_path / "in", count=1)
    answers = iter([(503, {"Retry-After": malformed}, {})])
    stow_server.script = lambda n, sent: next(answers, None) or accept_all(n, sent)

    drain(timeout=15)

    assert states() == {"delivered": 1}
    assert stow_server.requests[1].started - stow_server.requests[0].ended < 1.0  # 0.2 s backoff, not a wait
    assert DeliveryAttempt.objects.get(outcome="retry").error == "STOW-RS answered HTTP 503"
