"""`manage.py echo NODE`: C-ECHO a registered node and say exactly what happened."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Q

from gateway import services
from gateway.models import Node


class Command(BaseCommand):
    help = "Send a C-ECHO to a registered node (by name or AE title) and print the result and round-trip time."

    def add_arguments(self, parser) -> None:
        parser.add_argument("node", help="node name or AE title")
        parser.add_argument("--timeout", type=float, default=None, help="seconds (default ISTHMUS_DIMSE_TIMEOUT)")

    def handle(self, *args, node: str, timeout: float | None, **options) -> None:
        matches = list(Node.objects.filter(Q(name=node) | Q(ae_title=node)))
        if not matches:
            raise CommandError(f"no node named {node!r} (see the admin, or manage.py export_config)")
        failed = 0
        for target in matches:
            result = services.verify_node(node=target, timeout=timeout)
            line = f"{target.name} {target.ae_title}@{target.host}:{target.port}: {result}"
            if result.ok:
                self.stdout.write(self.style.SUCCESS(line))
            else:
                failed += 1
                self.stdout.write(self.style.ERROR(line))
        if failed:
            raise SystemExit(1)
