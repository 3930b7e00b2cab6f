"""Bearer-token authentication and read/write scopes for DICOMweb (and the REST API).

Views declare what they need with `permission_classes = [ReadScope]` or
`[WriteScope]`; authentication_classes lists BearerTokenAuthentication.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from dicomweb.models import ApiToken, hash_token

# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class TokenUser:
    """request.user for a request authenticated by an API token."""

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, token: ApiToken) -> None:
        self.token = token
        self.username = f"token:{token.name}"

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
        token = ApiToken.objects.filter(key_hash=hash_token(raw)).first()
        now = timezone.now()
        if token is None or not token.usable(now):
            raise exceptions.AuthenticationFailed("Invalid, revoked or expired token.")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return TokenUser(token), token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="isthmus"'


def _token(request) -> ApiToken | None:
    return request.auth if isinstance(request.auth, ApiToken) else None


class ReadScope(permissions.BasePermission):
    """QIDO-RS and WADO-RS: a token with read scope (or a logged-in staff user)."""

    message = "This token has no read scope."

    def has_permission(self, request, view) -> bool:
        token = _token(request)
        if token is not None:
            return token.can_read
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class WriteScope(permissions.BasePermission):
    """STOW-RS: a token with write scope (or a logged-in staff user)."""

    message = "This token has no write scope."

    def has_permission(self, request, view) -> bool:
        token = _token(request)
        if token is not None:
            return token.can_write
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)
