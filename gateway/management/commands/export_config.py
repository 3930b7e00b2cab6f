"""`manage.py export_config [FILE]`: nodes, destinations, rules and HL7 senders as YAML."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from gateway.config_file import ConfigError, export_config


class Command(BaseCommand):
    help = "Write the configuration (nodes, destinations, rules, hl7_senders) as YAML to FILE or standard output."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", nargs="?", help="output file (default: standard output)")
        parser.add_argument(
            "--include-secrets",
            action="store_true",
            help='write passwords, tokens and client secrets (otherwise "********", which import keeps as is)',
        )

    def handle(self, *args, file: str | None, include_secrets: bool, **options) -> None:
        try:
            text = export_config(include_secrets=include_secrets)
        except ConfigError as exc:  # a secret the current key cannot decrypt
            for error in exc.errors:
                self.stderr.write(f"error: {error}")
            raise CommandError("nothing exported") from exc
        if file:
            with open(file, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.stderr.write(f"wrote {file}")
        else:
            self.stdout.write(text, ending="")
