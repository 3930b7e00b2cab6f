"""Typed readers for environment settings that fail loudly, naming the variable.

Settings call these; a bad value collects one line per variable so start-up
stops with a message an administrator can act on, not a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
# PS3.5 6.2: AE is up to 16 characters of the default repertoire, no backslash
# or control characters, and not only spaces.
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class EnvError(ValueError):
    """A setting with a value that cannot be used."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"invalid {name}={value!r}: expected {expected}")
        self.name = name


class Env:
    """Collects settings errors so all bad variables are reported at once."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.errors: list[str] = []

    def _read(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        raw = self.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError):
            self.errors.append(str(EnvError(name, raw, expected)))
            return default

    def str(self, name: str, default: str) -> str:
        return self._read(name, default, str, "a string")

    def bool(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            word = raw.lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueError(raw)

        return self._read(name, default, parse, "true or false")

    def int(self, name: str, default: int, low: int | None = None, high: int | None = None) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(raw)
            return value

        bounds = f" from {low} to {high}" if low is not None and high is not None else ""
        return self._read(name, default, parse, f"an integer{bounds}")

    def float(self, name: str, default: float, low: float = 0.0) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if value < low:
                raise ValueError(raw)
            return value

        return self._read(name, default, parse, f"a number >= {low:g}")

    def port(self, name: str, default: int) -> int:
        return self.int(name, default, 1, 65535)

    def ae_title(self, name: str, default: str) -> str:
        def parse(raw: str) -> str:
            if not AE_TITLE_RE.match(raw):
                raise ValueError(raw)
            return raw

        return self._read(name, default, parse, "an AE title of 1-16 characters without backslash")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if raw.lower() not in choices:
                raise ValueError(raw)
            return raw.lower()

        return self._read(name, default, parse, "one of " + ", ".join(choices))

    def list(self, name: str, default: list[str]) -> list[str]:
        return self._read(
            name, default, lambda raw: [p.strip() for p in raw.split(",") if p.strip()], "a comma-separated list"
        )

    def fail(self, name: str, value: str, expected: str) -> None:
        self.errors.append(str(EnvError(name, value, expected)))
