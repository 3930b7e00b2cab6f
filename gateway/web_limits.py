"""Per-source limits on the web port: failed logins (admin form, HTTP Basic) and failed bearer tokens.

Only failures are counted (gateway/ratelimit.py); a source over its limit is refused until its
window ends, even with good credentials, so guessing gains nothing. A request that succeeds costs
one cache read and no write. Each block is logged once, with the address and never a user name.
"""

from __future__ import annotations

import ipaddress
import logging

from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from gateway import ratelimit

log = logging.getLogger("isthmus.web")

TOKEN, LOGIN_ADDRESS, LOGIN_USER = "web-token", "web-login", "web-login-user"


def client_address(request: HttpRequest) -> str:
    """The peer's address; behind ISTHMUS_BEHIND_HTTPS_PROXY, the one the trusted proxy saw (X-Forwarded-For)."""
    remote = request.META.get("REMOTE_ADDR", "")
    if not settings.BEHIND_HTTPS_PROXY or not _trusted(remote):
        return remote
    # Each proxy appends the address it received from; the right-most untrusted one is the client.
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop):
            return hop[:64]
    return hops[0][:64] if hops else remote


def _trusted(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in settings.TRUSTED_PROXIES)


def _wait(kind: str, source: str, window: int) -> int:
    return ratelimit.retry_after(kind, source) or window


def token_blocked(address: str) -> int:
    """Seconds `address` must wait before a bearer token is looked at again (0: not blocked)."""
    if not ratelimit.blocked(TOKEN, address, limit=settings.TOKEN_FAILURE_LIMIT):
        return 0
    return _wait(TOKEN, address, settings.TOKEN_FAILURE_WINDOW)


def token_failed(address: str) -> int:
    """Count a bad, expired or revoked token or JWT; seconds to wait if this failure blocked `address`."""
    limit, window = settings.TOKEN_FAILURE_LIMIT, settings.TOKEN_FAILURE_WINDOW
    if ratelimit.hit(TOKEN, address, limit=limit, window=window):
        return 0
    wait = _wait(TOKEN, address, window)
    log.warning("bearer tokens from %s refused for %d s: more than %d failures", address, wait, limit)
    return wait


def login_blocked(address: str, username: str) -> int:
    """Seconds before a login from `address`, or for `username`, is checked again (0: not blocked)."""
    limit, window = settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW
    if ratelimit.blocked(LOGIN_ADDRESS, address, limit=limit):
        return _wait(LOGIN_ADDRESS, address, window)
    if username and ratelimit.blocked(LOGIN_USER, username, limit=limit):
        return _wait(LOGIN_USER, username, window)
    return 0


@receiver(user_login_failed, dispatch_uid="isthmus-login-failed")
def login_failed(sender, credentials: dict, request: HttpRequest | None = None, **kwargs) -> None:
    """Django's signal for a wrong password (admin form or HTTP Basic): count it by address and user name."""
    if request is None:  # authenticate() called outside a request: a shell, a test
        return
    address, username = client_address(request), str(credentials.get("username") or "")
    limit, window = settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW
    if not ratelimit.hit(LOGIN_ADDRESS, address, limit=limit, window=window):
        wait = _wait(LOGIN_ADDRESS, address, window)
        log.warning("logins from %s refused for %d s: more than %d failures", address, wait, limit)
    if username and not ratelimit.hit(LOGIN_USER, username, limit=limit, window=window):
        wait = _wait(LOGIN_USER, username, window)
        log.warning("logins to one user name refused for %d s: more than %d failures, the last from %s",
                    wait, limit, address)  # fmt: skip


@receiver(user_logged_in, dispatch_uid="isthmus-logged-in")
def logged_in(sender, request: HttpRequest | None, user, **kwargs) -> None:
    """A good password clears its user name's count; the address keeps its own (one account must not reset it)."""
    ratelimit.reset(LOGIN_USER, user.get_username())
