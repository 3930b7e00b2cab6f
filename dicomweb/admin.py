"""API tokens in the admin: the raw token is shown once, right after it is created; revoking is an action."""

from __future__ import annotations

from django.contrib import admin, messages

from dicomweb.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "can_read", "can_write", "can_worklist", "can_admin", "expires_at",
                    "last_used_at", "revoked", "created_at")  # fmt: skip
    list_filter = ("revoked", "can_read", "can_write", "can_worklist", "can_admin")
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "last_used_at", "created_at")
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        fields = ["name", "can_read", "can_write", "can_worklist", "can_admin", "expires_at"]
        return fields if obj is None else [*fields, "revoked", *self.readonly_fields]

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        raw = None if change else obj.new_key()
        super().save_model(request, obj, form, change)
        if raw:
            messages.warning(
                request, f"Token for {obj.name}: {raw}  Copy it now: it is stored hashed and never shown again."
            )

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset) -> None:
        count = queryset.update(revoked=True)
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)
