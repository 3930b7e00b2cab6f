"""Isthmus gateway: settings, nodes, the DIMSE listener and the instance store."""

from gateway.celery import app as celery_app

__all__ = ("celery_app",)
