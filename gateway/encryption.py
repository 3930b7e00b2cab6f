"""Secrets at rest: destination passwords, tokens and client secrets encrypted in the database with Fernet.

The key is ISTHMUS_SECRETS_KEY, or else DATA_DIR/secrets_key, generated 0600 the first time a secret
is saved. A copy of the database alone (a backup, a dump) holds no usable credential. Code reads the
plain value from the model as before; a secret this key cannot open reads as an UndecryptableSecret,
which says why where it is used and is saved back unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django import forms
from django.conf import settings
from django.core import validators
from django.db import models

from gateway import private_files

PREFIX = "fernet:"  # what marks a stored value as encrypted: values saved before encryption have none
KEY_FILE = "secrets_key"


class UndecryptableSecret(str):
    """A stored secret the current key cannot open: its text is the stored token, kept as is when saved."""

    def __new__(cls, stored: str, reason: str) -> UndecryptableSecret:
        secret = super().__new__(cls, stored)
        secret.reason = reason
        return secret


def _key_path() -> Path:
    return Path(settings.DATA_DIR) / KEY_FILE


@functools.lru_cache(maxsize=4)
def _fernet(key: str) -> Fernet:
    return Fernet(key)


def _key(*, create: bool) -> str | None:
    if settings.SECRETS_KEY:
        return settings.SECRETS_KEY
    path = _key_path()
    if create:
        return private_files.read_or_create(path, lambda: Fernet.generate_key().decode())
    return path.read_text().strip() if path.exists() else None


def encrypt(plain: str) -> str:
    """The stored form of a secret; blank stays blank (no secret), an undecryptable one stays as it was."""
    if not plain or isinstance(plain, UndecryptableSecret):
        return plain
    return PREFIX + _fernet(_key(create=True)).encrypt(plain.encode()).decode()


def decrypt(stored: str) -> str:
    """The secret of a stored value: plain text, or an UndecryptableSecret saying why not."""
    if not stored or not stored.startswith(PREFIX):
        return stored  # blank, or saved before encryption (the migration encrypts those)
    key = _key(create=False)
    if key is None:
        return UndecryptableSecret(
            stored, f"cannot be decrypted: no key (set ISTHMUS_SECRETS_KEY or restore {_key_path()})"
        )
    try:
        return _fernet(key).decrypt(stored[len(PREFIX) :].encode()).decode()
    except (InvalidToken, ValueError):
        return UndecryptableSecret(
            stored,
            f"cannot be decrypted with this key (ISTHMUS_SECRETS_KEY or {_key_path()}): "
            "restore the key it was saved with, or enter the secret again",
        )


class EncryptedField(models.TextField):
    """A secret kept encrypted in its column and plain on the model; forms show a password box that is never filled."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.max_length:  # of the plain secret; the column is text, the token is longer
            self.validators.append(validators.MaxLengthValidator(self.max_length))

    def from_db_value(self, value: str | None, expression, connection) -> str | None:
        return decrypt(value) if value is not None else value

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PREFIX) and not isinstance(value, UndecryptableSecret):
            return decrypt(value)  # loaddata of a dumpdata: the stored form
        return value

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        return encrypt(value) if isinstance(value, str) else value

    def value_to_string(self, obj: models.Model) -> str:
        return encrypt(self.value_from_object(obj) or "")  # dumpdata writes the stored form, not the secret

    def run_validators(self, value: Any) -> None:
        if not isinstance(value, UndecryptableSecret):  # kept as stored: its length is the token's
            super().run_validators(value)

    def formfield(self, **kwargs) -> forms.Field:
        defaults = {"form_class": forms.CharField, "max_length": self.max_length, "strip": False,
                    "widget": forms.PasswordInput(render_value=False)}  # fmt: skip
        return super(models.TextField, self).formfield(**{**defaults, **kwargs})
