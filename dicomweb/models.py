"""API tokens for DICOMweb and the REST API: only a hash is stored, the token is shown once.

Scopes, least first: read (QIDO-RS, WADO-RS), write (STOW-RS only), worklist (orders through
/api/worklist/), admin (/api/nodes and every other configuration endpoint). None implies another.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.db import models
from django.utils import timezone

PREFIX = "isth_"


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token with its scopes, an optional expiry, and when it was last used."""

    name = models.CharField(max_length=64, unique=True, help_text="Who or what uses it: a viewer, a script...")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=16, editable=False, help_text="The first characters, to recognise it.")
    can_read = models.BooleanField(
        "read scope", default=True, help_text="QIDO-RS, WADO-RS, reading orders, /healthz detail."
    )
    can_write = models.BooleanField("write scope", default=False, help_text="STOW-RS.")
    can_worklist = models.BooleanField(
        "worklist scope", default=False, help_text="Create, change and cancel orders (/api/worklist/orders/)."
    )
    can_admin = models.BooleanField(
        "admin scope", default=False, help_text="Nodes and every configuration endpoint of /api/."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(
        cls,
        name: str,
        *,
        read: bool = True,
        write: bool = False,
        worklist: bool = False,
        admin: bool = False,
        expires_at: datetime | None = None,
    ) -> tuple[ApiToken, str]:
        """Create a token; returns the row and the raw token, which is never stored and cannot be shown again."""
        token = cls(
            name=name, can_read=read, can_write=write, can_worklist=worklist, can_admin=admin, expires_at=expires_at
        )
        raw = token.new_key()
        token.save()
        return token, raw

    def new_key(self) -> str:
        """Give this (unsaved) row a fresh key; returns the raw token, of which only a hash is kept."""
        raw = PREFIX + secrets.token_urlsafe(32)
        self.key_hash = hash_token(raw)
        self.prefix = raw[: len(PREFIX) + 6]
        return raw

    def scopes(self) -> list[str]:
        """The scope names this token grants, as create_token spells them."""
        flags = {"read": self.can_read, "write": self.can_write, "worklist": self.can_worklist, "admin": self.can_admin}
        return [name for name, granted in flags.items() if granted]

    def usable(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        return not self.revoked and (self.expires_at is None or self.expires_at > now)
