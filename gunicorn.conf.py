"""gunicorn settings for Isthmus's web process, read from the working directory (the project root).

`manage.py run` passes this file explicitly; `gunicorn gateway.wsgi` started elsewhere needs
`--config /path/to/isthmus/gunicorn.conf.py`.
"""

# The access log without patient data: query strings and the Referer show parameter names, not values.
logger_class = "gateway.weblog.PrivateLogger"
# gunicorn's own files (its control and worker temporary files) for its user only, like the rest.
umask = 0o077
