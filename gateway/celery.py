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
    "sweep-commitment-reports": {"task": "gateway.tasks.sweep_commitment_reports", "schedule": 15.0},
    "deliver-mpps-relays": {"task": "worklist.tasks.deliver_mpps_relays", "schedule": 15.0},
}
