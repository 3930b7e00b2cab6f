"""`manage.py import_config FILE [--dry-run]`: make the registry match a file, printing the diff."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError

from gateway.config_file import ConfigError, import_config


class Command(BaseCommand):
    help = (
        "Apply a configuration file: every section in it (nodes, destinations, rules, hl7_senders) is made to match, "
        "objects missing from a listed section are deleted. All or nothing."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="YAML file, or - for standard input")
        parser.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")

    def handle(self, *args, file: str, dry_run: bool, **options) -> None:
        try:
            text = sys.stdin.read() if file == "-" else open(file, encoding="utf-8").read()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from exc
        try:
            changes = import_config(text, dry_run=dry_run)
        except ConfigError as exc:
            for error in exc.errors:
                self.stderr.write(f"error: {error}")
            raise CommandError(f"{file}: {len(exc.errors)} error(s), nothing applied") from exc
        for change in changes:
            self.stdout.write(str(change))
        counts = {action: sum(c.action == action for c in changes) for action in ("create", "update", "delete")}
        summary = f"{counts['create']} added, {counts['update']} changed, {counts['delete']} removed"
        if not changes:
            self.stdout.write("no changes: the configuration already matches the file")
        elif dry_run:
            self.stdout.write(f"dry run: {summary}; nothing applied")
        else:
            self.stdout.write(self.style.SUCCESS(f"applied: {summary}"))
