"""WSGI entry point for gunicorn: `gunicorn gateway.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
application = get_wsgi_application()

# Import every view now, in each worker as it boots, rather than in its first request.
_views = get_resolver().url_patterns
