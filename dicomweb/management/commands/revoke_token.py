"""`manage.py revoke_token NAME`: the token stops working at once; the row stays for the record."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from dicomweb.models import ApiToken


class Command(BaseCommand):
    help = "Revoke an API token by name."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name")

    def handle(self, *args, name: str, **options) -> None:
        if not ApiToken.objects.filter(name=name).update(revoked=True):
            raise CommandError(f"no token named {name!r} (manage.py list_tokens)")
        self.stdout.write(f"revoked {name}")
