"""`manage.py hl7_send FILE`: send the HL7 messages in FILE over MLLP and print each ACK.

Line ends in the file may be LF or CRLF (HL7 wants CR; they are converted).
The bytes are sent as they are, so the file's encoding must match its MSH-18.
"""

from __future__ import annotations

import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from worklist.hl7.mllp import send, split_messages


class Command(BaseCommand):
    help = "Send HL7 v2 messages from a file (or - for stdin) over MLLP and print the acknowledgements."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="a file of one or more HL7 messages, or - for stdin")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.HL7_PORT)
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")

    def handle(self, *args, file: str, host: str, port: int, timeout: float, **options) -> None:
        try:
            data = sys.stdin.buffer.read() if file == "-" else open(file, "rb").read()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror or exc}") from exc
        messages = split_messages(data)
        if not messages:
            raise CommandError(f"no HL7 message in {file}")
        try:
            acks = send(host, port, messages, timeout=timeout)
        except OSError as exc:
            raise CommandError(f"HL7 to {host}:{port}: {exc.strerror or exc}") from exc
        failed = 0
        for ack in acks:
            text = ack.decode("utf-8", errors="replace")
            self.stdout.write(text.replace("\r", "\n").rstrip("\n"))
            msa = next((line for line in text.split("\r") if line.startswith("MSA")), "")
            failed += 0 if msa.split("|")[1:2] == ["AA"] else 1
        if failed:
            raise CommandError(f"{failed} of {len(acks)} messages not accepted (see the MSA and ERR above)")
