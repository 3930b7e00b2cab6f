"""`manage.py list_tokens`: name, prefix, scopes, expiry, last use, state; never the token itself."""

from __future__ import annotations

from django.core.management.base import BaseCommand
from django.utils import timezone

from dicomweb.models import ApiToken


def _when(moment) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else "-"


class Command(BaseCommand):
    help = "List API tokens (the tokens themselves are not stored, only their prefix)."

    def handle(self, *args, **options) -> None:
        now = timezone.now()
        self.stdout.write(f"{'name':24} {'prefix':12} {'scope':24} {'expires':16} {'last used':16} state")
        for token in ApiToken.objects.all():
            scope = ",".join(token.scopes())
            state = "revoked" if token.revoked else "active" if token.usable(now) else "expired"
            self.stdout.write(
                f"{token.name:24} {token.prefix:12} {scope or '-':24} "
                f"{_when(token.expires_at):16} {_when(token.last_used_at):16} {state}"
            )
