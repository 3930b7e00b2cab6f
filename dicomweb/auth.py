"""Bearer-token authentication and read/write scopes for DICOMweb and the REST API.

Two kinds of bearer token: Isthmus API tokens (`isth_...`, stored hashed,
managed in the admin or with `manage.py create_token`) and, where an identity
provider is configured (ISTHMUS_JWT_PUBLIC_KEY), signed JWTs whose `scope`
claim grants `dicomweb.read` and/or `dicomweb.write`. Views declare what they
need with `permission_classes = [ReadScope]` or `[WriteScope]`; the REST API's
default permission is ApiScope.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta

import jwt
from django.conf import settings
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from dicomweb.models import PREFIX, ApiToken, hash_token

# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
READ_SCOPE, WRITE_SCOPE = "dicomweb.read", "dicomweb.write"


@dataclass(frozen=True)
class JwtGrant:
    """What a verified JWT grants: its subject (the name we record) and its scopes."""

    name: str
    can_read: bool
    can_write: bool


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
    """`Authorization: Bearer <token>`: a missing header leaves the request anonymous; a bad token is 401."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
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
    return JwtGrant(name=str(claims["sub"]), can_read=READ_SCOPE in scopes, can_write=WRITE_SCOPE in scopes)


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
    """ISTHMUS_DICOMWEB_OPEN_READ_NETWORKS: reads without a token from these networks (REMOTE_ADDR, not proxies)."""
    if not settings.DICOMWEB_OPEN_READ_NETWORKS:
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
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


class ApiScope(permissions.BasePermission):
    """The REST API (/api/): staff users as before, or a token: read scope to read, write scope to change."""

    message = "This token has no scope for this request."

    def has_permission(self, request, view) -> bool:
        grant = _grant(request)
        if grant is not None:
            return grant.can_read if request.method in permissions.SAFE_METHODS else grant.can_write
        return _staff(request)


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """How /api/schema/ (drf-spectacular) describes BearerTokenAuthentication."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "bearer", "description": "An API token (isth_...) or, if configured, a JWT."}
