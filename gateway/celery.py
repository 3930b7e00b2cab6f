"""The Celery app: `celery -A gateway worker` (add `-B` for beat in one process)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")

app = Celery("isthmus")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    "worker-heartbeat": {"task": "gateway.tasks.worker_heartbeat", "schedule": 10.0},
    "prune-association-events": {"task": "gateway.tasks.prune_association_events", "schedule": 3600.0},
}
