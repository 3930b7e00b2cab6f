"""Forms and validation for the operators: rule conditions, and choosing a destination by hand."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db import models

from gateway.encryption import UndecryptableSecret
from routing.models import Destination, Rule
from routing.rules import validate_conditions as validate_rule_conditions


def condition_errors(conditions: Any) -> list[str]:
    """What is wrong with a rule's conditions, each message prefixed with its keyword (routing.rules' syntax)."""
    if not isinstance(conditions, dict):
        return validate_rule_conditions(conditions)
    return [
        f"{keyword}: {error}"
        for keyword, pattern in conditions.items()
        for error in validate_rule_conditions({keyword: pattern})
    ]


def validate_conditions(conditions: Any) -> None:
    """Model-style validator: raises ValidationError listing every bad condition."""
    errors = condition_errors(conditions)
    if errors:
        raise ValidationError(errors)


class RuleForm(forms.ModelForm):
    """The rule's conditions as JSON, checked key by key so a typo is a form error, not a silent no-match."""

    class Meta:
        model = Rule
        fields = "__all__"
        widgets = {"conditions": forms.Textarea(attrs={"rows": 6, "cols": 80, "style": "font-family: monospace"})}

    def clean_conditions(self) -> dict:
        conditions = self.cleaned_data.get("conditions") or {}
        validate_conditions(conditions)
        return conditions


SECRETS = Destination.SECRETS


def _https_by_default(db_field, **kwargs) -> forms.Field | None:
    """A URL typed without a scheme means https (Django 6's default, chosen now)."""
    if isinstance(db_field, models.URLField):
        kwargs["assume_scheme"] = "https"
    return db_field.formfield(**kwargs)


class DestinationForm(forms.ModelForm):
    """Secrets are never sent back to the browser; a blank secret field keeps the stored value."""

    class Meta:
        model = Destination
        fields = "__all__"
        widgets = {name: forms.PasswordInput(render_value=False) for name in SECRETS}
        formfield_callback = _https_by_default

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in SECRETS:
            stored = getattr(self.instance, name) if self.instance.pk else ""
            if name not in self.fields or not stored:
                continue
            if isinstance(stored, UndecryptableSecret):
                self.fields[name].help_text = f"Set, but it {stored.reason}."
            else:
                self.fields[name].help_text = "Set; leave blank to keep it, or type a new one."

    def _keep_secret(self, name: str) -> str:
        value = self.cleaned_data.get(name) or ""
        return value if value or self.instance.pk is None else getattr(self.instance, name)

    def clean_password(self) -> str:
        return self._keep_secret("password")

    def clean_token(self) -> str:
        return self._keep_secret("token")

    def clean_oauth_client_secret(self) -> str:
        return self._keep_secret("oauth_client_secret")


class SendStudiesForm(forms.Form):
    """The intermediate page of the studies browser's "Send to a destination" action."""

    destination = forms.ModelChoiceField(
        queryset=Destination.objects.filter(enabled=True).order_by("name"),
        empty_label=None,
        help_text="Every instance of the selected studies is queued for this destination.",
    )
