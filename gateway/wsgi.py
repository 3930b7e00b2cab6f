"""WSGI entry point for gunicorn: `gunicorn gateway.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

from gateway.malloc import keep_large_buffers

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
keep_large_buffers()  # each worker imports this module after the fork
application = get_wsgi_application()

# Import every view now, in each worker as it boots, rather than in its first request.
_views = get_resolver().url_patterns
