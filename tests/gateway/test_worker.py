"""A real Celery worker consumes a real queue: Redis in production, the filesystem queue embedded."""

from __future__ import annotations

import time

import pytest
from django.conf import settings
from kombu import Connection

from gateway.models import Heartbeat
from gateway.tasks import worker_heartbeat
from tests.conftest import REDIS_URL, spawn_python, stop_process


@pytest.mark.parametrize("broker", [REDIS_URL, "filesystem://"])
def test_worker_runs_a_task_sent_through_the_broker(transactional_db, broker):
    overrides = {"CELERY_BROKER_URL": broker} if broker != "filesystem://" else {}
    celery = (
        "-m",
        "celery",
        "-A",
        "gateway",
        "worker",
        "--pool",
        "solo",
        "--hostname",
        "test@%h",
        "--loglevel",
        "WARNING",
    )
    worker = spawn_python(*celery, **overrides)
    try:
        if broker == settings.CELERY_BROKER_URL:
            worker_heartbeat.delay()  # the embedded queue this test run is configured with
        else:
            with Connection(broker) as connection:
                worker_heartbeat.apply_async(connection=connection)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not Heartbeat.objects.filter(kind="worker").exists():
            assert worker.poll() is None, "worker exited"
            time.sleep(0.1)
        beat = Heartbeat.objects.get(kind="worker")
        assert beat.instance.startswith("test@")
    finally:
        stop_process(worker, timeout=20)
