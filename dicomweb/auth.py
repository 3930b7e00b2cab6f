"""Bearer-token authentication and scopes for DICOMweb and the REST API.

Two kinds of bearer token: Isthmus API tokens (`isth_...`, stored hashed,
managed in the admin or with `manage.py create_token`) and, where an identity
provider is configured (ISTHMUS_JWT_PUBLIC_KEY), signed JWTs whose `scope`
claim grants `dicomweb.read`, `dicomweb.write`, `isthmus.worklist` and/or
`isthmus.admin`. Scopes do not imply one another: read is QIDO-RS and WADO-RS,
write is STOW-RS only, worklist is orders through /api/worklist/, admin is
/api/nodes and every other configuration endpoint (the REST API's default
permission). A source that sends too many bad tokens, or bad passwords, is
refused with 429 for a while (gateway/web_limits.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta

import jwt
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from dicomweb.models import PREFIX, ApiToken, hash_token
from gateway import web_limits

# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
READ_SCOPE, WRITE_SCOPE = "dicomweb.read", "dicomweb.write"
WORKLIST_SCOPE, ADMIN_SCOPE = "isthmus.worklist", "isthmus.admin"


@dataclass(frozen=True)
class JwtGrant:
    """What a verified JWT grants: its subject (the name we record) and its scopes."""

    name: str
    can_read: bool
    can_write: bool
    can_worklist: bool = False
    can_admin: bool = False


class TooManyFailures(exceptions.Throttled):
    """429 for a source past its failure limit, whatever it sends now; dicomweb.base renders it as a problem."""

    def __init__(self, wait: int) -> None:
        super().__init__(wait, f"Too many failed attempts; try again in {wait} s.")


class TokenUser:
    """request.user for a request authenticated by a bearer token (API token or JWT)."""

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, token: ApiToken | JwtGrant, kind: str = "token") -> None:
        self.token = token
        self.username = f"{kind}:{token.name}"

    def __str__(self) -> str:
        return self.username


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <token>`: no header leaves the request anonymous; a bad token is 401, too many 429."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        address = web_limits.client_address(request)
        wait = web_limits.token_blocked(address)
        if wait:
            raise TooManyFailures(wait)
        try:
            return self._verify(header)
        except exceptions.AuthenticationFailed:
            wait = web_limits.token_failed(address)
            if wait:
                raise TooManyFailures(wait) from None
            raise

    def _verify(self, header: list[bytes]):
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
        raw = header[1].decode("latin-1")
        if not raw.startswith(PREFIX) and raw.count(".") == 2 and settings.JWT_PUBLIC_KEY:
            grant = verify_jwt(raw)
            return TokenUser(grant, "jwt"), grant
        return self._api_token(raw)

    def _api_token(self, raw: str):
        token = ApiToken.objects.filter(key_hash=hash_token(raw)).first()
        now = timezone.now()
        if token is None or not token.usable(now):
            raise exceptions.AuthenticationFailed("Invalid, revoked or expired token.")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return TokenUser(token), token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="isthmus"'


def verify_jwt(raw: str) -> JwtGrant:
    """Check signature, expiry, issuer and audience against the configured identity provider."""
    try:
        claims = jwt.decode(
            raw,
            settings.JWT_PUBLIC_KEY,
            algorithms=settings.JWT_ALGORITHMS,
            issuer=settings.JWT_ISSUER or None,
            audience=settings.JWT_AUDIENCE or None,
            options={"require": ["exp", "sub"], "verify_aud": bool(settings.JWT_AUDIENCE)},
            leeway=30,
        )
    except jwt.InvalidTokenError as exc:
        raise exceptions.AuthenticationFailed(f"Invalid JWT: {exc}") from exc
    scopes = _scopes(claims)
    return JwtGrant(
        name=str(claims["sub"]),
        can_read=READ_SCOPE in scopes,
        can_write=WRITE_SCOPE in scopes,
        can_worklist=WORKLIST_SCOPE in scopes,
        can_admin=ADMIN_SCOPE in scopes,
    )


def _scopes(claims: dict) -> set[str]:
    """OAuth 2 `scope` (space-separated string, RFC 9068) or `scp` (a list, as some providers send)."""
    scopes: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(str(item) for item in value)
    return scopes


def _grant(request) -> ApiToken | JwtGrant | None:
    return request.auth if isinstance(request.auth, ApiToken | JwtGrant) else None


def _staff(request) -> bool:
    return bool(request.user and request.user.is_authenticated and request.user.is_staff)


def open_read_network(request) -> bool:
    """ISTHMUS_DICOMWEB_OPEN_READ_NETWORKS: reads without a token from these networks (the client's address)."""
    if not settings.DICOMWEB_OPEN_READ_NETWORKS:
        return False
    try:
        address = ipaddress.ip_address(web_limits.client_address(request))
    except ValueError:
        return False
    return any(address in network for network in settings.DICOMWEB_OPEN_READ_NETWORKS)


class ReadScope(permissions.BasePermission):
    """QIDO-RS and WADO-RS: a token with read scope, a logged-in staff user, or an open read network."""

    message = "This token has no read scope."

    def has_permission(self, request, view) -> bool:
        grant = _grant(request)
        if grant is not None:
            return grant.can_read
        return _staff(request) or open_read_network(request)


class WriteScope(permissions.BasePermission):
    """STOW-RS: a token with write scope (or a logged-in staff user)."""

    message = "This token has no write scope."

    def has_permission(self, request, view) -> bool:
        grant = _grant(request)
        if grant is not None:
            return grant.can_write
        return _staff(request)


class AdminScope(permissions.BasePermission):
    """/api/nodes and every configuration endpoint (the REST API's default): admin scope, or a staff session."""

    message = "This token has no admin scope."

    def has_permission(self, request, view) -> bool:
        grant = _grant(request)
        if grant is not None:
            return grant.can_admin
        return _staff(request)


class WorklistScope(permissions.BasePermission):
    """/api/worklist/orders: read scope reads, worklist scope reads and changes; staff sessions do both."""

    message = "This token has no worklist scope."

    def has_permission(self, request, view) -> bool:
        grant = _grant(request)
        if grant is not None:
            return grant.can_worklist or (grant.can_read and request.method in permissions.SAFE_METHODS)
        return _staff(request)


class AnyScope(permissions.BasePermission):
    """What describes the API (/api/schema/): any usable token, or a staff session."""

    def has_permission(self, request, view) -> bool:
        return _grant(request) is not None or _staff(request)


class OptionalBasicAuthentication(authentication.BasicAuthentication):
    """HTTP Basic on /api/ only with ISTHMUS_API_BASIC_AUTH; its failures count toward the login limit."""

    def authenticate(self, request):
        if not settings.API_BASIC_AUTH:
            return None  # the header is ignored: the request stays anonymous and is refused
        return super().authenticate(request)

    def authenticate_credentials(self, userid, password, request=None):
        wait = web_limits.login_blocked(web_limits.client_address(request), userid)
        if wait:
            raise TooManyFailures(wait)
        return super().authenticate_credentials(userid, password, request)  # a failure sends user_login_failed


def may_see_health_detail(request: HttpRequest) -> bool:
    """/healthz detail (paths, errors, addresses): a staff session, or a token with read or admin scope.

    A bad token here is counted like anywhere else but answered with the summary, so a monitor stays green.
    """
    try:
        if _staff(request):
            return True
        authenticated = BearerTokenAuthentication().authenticate(request)
    except (exceptions.APIException, DatabaseError):  # a bad token, a blocked source, the database down
        return False
    return authenticated is not None and (authenticated[1].can_read or authenticated[1].can_admin)


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """How /api/schema/ (drf-spectacular) describes BearerTokenAuthentication."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "bearer", "description": "An API token (isth_...) or, if configured, a JWT."}


class OptionalBasicScheme(OpenApiAuthenticationExtension):
    """How /api/schema/ describes OptionalBasicAuthentication."""

    target_class = OptionalBasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "basic", "description": "Staff users, only if ISTHMUS_API_BASIC_AUTH=true."}
