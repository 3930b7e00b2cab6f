"""The Celery app: `celery -A gateway worker` (add `-B` for beat in one process)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")

app = Celery("isthmus")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _routing_sweep_seconds() -> float:
    """settings.ROUTING_SWEEP_SECONDS, read here from the environment: this module loads before the settings."""
    from gateway.env import Env

    return Env().float("ISTHMUS_ROUTING_SWEEP_SECONDS", 10.0, low=0.5)


app.conf.beat_schedule = {
    "worker-heartbeat": {"task": "gateway.tasks.worker_heartbeat", "schedule": 10.0},
    "prune-association-events": {"task": "gateway.tasks.prune_association_events", "schedule": 3600.0},
    "sweep-commitment-reports": {"task": "gateway.tasks.sweep_commitment_reports", "schedule": 15.0},
    "deliver-mpps-relays": {"task": "worklist.tasks.deliver_mpps_relays", "schedule": 15.0},
    "sweep-forward-jobs": {"task": "routing.tasks.sweep_forward_jobs", "schedule": _routing_sweep_seconds()},
}
