"""`manage.py create_token NAME --scope read,write --expires 90d`: issue an API token and print it, once.

Scopes: read (QIDO-RS, WADO-RS), write (STOW-RS), worklist (orders through the API), admin
(nodes and configuration through the API); comma-separated, none implies another.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from dicomweb.models import ApiToken

SCOPES = ("read", "write", "worklist", "admin")
UNITS = {"d": "days", "h": "hours", "w": "weeks"}


def parse_scopes(text: str) -> set[str]:
    scopes = {word.strip().lower() for word in text.split(",") if word.strip()}
    if not scopes or scopes - set(SCOPES):
        raise CommandError(f"--scope must be one or more of {','.join(SCOPES)} (comma-separated), not {text!r}")
    return scopes


def parse_expiry(text: str | None, now: datetime) -> datetime | None:
    """`90d`, `12h`, `2w`, or an ISO date-time; None never expires."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+)([dhw])", text.strip().lower())
    if match:
        return now + timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
    moment = parse_datetime(text)
    if moment is None:
        raise CommandError(f"--expires must look like 90d, 12h, 2w or 2027-01-31T00:00Z, not {text!r}")
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment)


class Command(BaseCommand):
    help = "Create a DICOMweb/API bearer token and print it; it is stored hashed and cannot be shown again."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", help="who or what uses it (unique)")
        parser.add_argument(
            "--scope", default="read", help="read, write, worklist, admin, comma-separated (default read)"
        )
        parser.add_argument("--expires", default=None, help="90d, 12h, 2w or an ISO date-time (default never)")

    def handle(self, *args, name: str, scope: str, expires: str | None, **options) -> None:
        scopes = parse_scopes(scope)
        expires_at = parse_expiry(expires, timezone.now())
        if ApiToken.objects.filter(name=name).exists():
            raise CommandError(f"a token named {name!r} exists (revoke_token {name}, or choose another name)")
        token, raw = ApiToken.issue(name, **{scope: scope in scopes for scope in SCOPES}, expires_at=expires_at)
        self.stdout.write(raw)
        until = f"until {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else "with no expiry"
        self.stderr.write(f"token {name!r} ({','.join(token.scopes())}) {until}; copy it now, it is not shown again")
