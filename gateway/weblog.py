"""gunicorn's logger without patient data: query strings and the Referer masked, bad request lines not quoted.

gunicorn.conf.py (read by gunicorn from the project root, and passed by `manage.py run`) names it.
"""

from __future__ import annotations

from gunicorn import glogging

from gateway.privacy import MaskQueryStrings, mask_query, mask_url

# gunicorn's warning for a request it cannot parse quotes the offending text (part of a request line).
INVALID_REQUEST = "Invalid request from ip="


class PrivateLogger(glogging.Logger):
    """The access log shows method, path, parameter names, status; never a parameter's value."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if not any(isinstance(existing, MaskQueryStrings) for existing in self.error_log.filters):
            self.error_log.addFilter(MaskQueryStrings())  # "Error handling request GET /path?query"

    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        request_line = (environ["REQUEST_METHOD"], mask_url(environ["RAW_URI"]), environ["SERVER_PROTOCOL"])
        atoms["r"] = " ".join(request_line)
        atoms["q"] = mask_query(atoms["q"] or "")
        atoms["f"] = mask_url(atoms["f"])
        if "{referer}i" in atoms:
            atoms["{referer}i"] = mask_url(atoms["{referer}i"])
        return atoms

    def warning(self, msg, *args, **kwargs) -> None:
        if isinstance(msg, str) and msg.startswith(INVALID_REQUEST):
            # "Invalid request from ip=1.2.3.4: Invalid HTTP Version: 'DOE HTTP/1.1'" -> "...: Invalid HTTP Version"
            where, _, error = msg.partition(": ")
            msg = f"{where}: {error.split(':', 1)[0]}"
        super().warning(msg, *args, **kwargs)
