"""Admin pages for nodes, association events and running processes."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from gateway import services
from gateway.models import AssociationEvent, Heartbeat, Node

admin.site.site_header = "Isthmus DICOM gateway"
admin.site.site_title = "Isthmus"
admin.site.index_title = "Administration"


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "ae_title", "address", "enabled", "direction", "last_seen", "last_error_short")
    list_filter = ("enabled", "allowed_in", "allowed_out")
    search_fields = ("name", "ae_title", "host", "description")
    readonly_fields = ("last_seen_at", "last_seen_address", "last_error", "last_error_at", "created_at", "updated_at")
    actions = ["verify"]
    fieldsets = (
        (None, {"fields": ("name", "ae_title", "host", "port", "description", "enabled")}),
        ("Direction", {"fields": ("allowed_in", "allowed_out")}),
        (
            "Services this node may use",
            {
                "fields": (
                    "allow_echo",
                    "allow_store",
                    "allow_worklist",
                    "allow_mpps",
                    "allow_query_retrieve",
                    "allow_commitment",
                )
            },
        ),  # fmt: skip
        ("Status", {"fields": readonly_fields}),
    )

    @admin.display(description="address", ordering="host")
    def address(self, node: Node) -> str:
        return f"{node.host or '*'}:{node.port}"

    @admin.display(description="direction")
    def direction(self, node: Node) -> str:
        return {(True, True): "in + out", (True, False): "in only", (False, True): "out only"}.get(
            (node.allowed_in, node.allowed_out), "none"
        )

    @admin.display(description="last seen", ordering="last_seen_at")
    def last_seen(self, node: Node) -> str:
        if node.last_seen_at is None:
            return "never"
        return f"{timesince(node.last_seen_at)} ago from {node.last_seen_address}"

    @admin.display(description="last error")
    def last_error_short(self, node: Node) -> str:
        if not node.last_error:
            return ""
        return format_html('<span title="{}" style="color:#ba2121">{}</span>', node.last_error, node.last_error[:60])

    @admin.action(description="Verify (C-ECHO) selected nodes")
    def verify(self, request: HttpRequest, queryset: QuerySet[Node]) -> TemplateResponse:
        results = services.verify_nodes(nodes=list(queryset))
        context = {
            **self.admin_site.each_context(request),
            "title": "Verify: C-ECHO results",
            "opts": self.model._meta,
            "results": results,
            "ok_count": sum(1 for _, result in results if result.ok),
        }
        return TemplateResponse(request, "admin/gateway/node/verify_results.html", context)


@admin.register(AssociationEvent)
class AssociationEventAdmin(admin.ModelAdmin):
    list_display = ("when", "caller", "called_ae", "accepted", "verdict", "node_name", "ending")
    list_filter = ("accepted", "reason", "outcome", "at")
    search_fields = ("calling_ae", "called_ae", "peer_address", "node__name")
    date_hierarchy = "at"
    list_select_related = ("node",)

    @admin.display(description="at", ordering="at")
    def when(self, event: AssociationEvent) -> str:
        return timezone.localtime(event.at).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="calling AE @ address", ordering="calling_ae")
    def caller(self, event: AssociationEvent) -> str:
        return f"{event.calling_ae} @ {event.peer_address}"

    @admin.display(description="reason", ordering="reason")
    def verdict(self, event: AssociationEvent) -> str:
        reason = event.get_reason_display()
        return f"{reason}: {event.detail}" if event.detail else reason

    @admin.display(description="node", ordering="node__name")
    def node_name(self, event: AssociationEvent) -> str:
        return event.node.name if event.node else ""

    @admin.display(description="ended")
    def ending(self, event: AssociationEvent) -> str:
        if event.outcome in ("", "rejected"):
            return "open" if event.accepted and event.ended_at is None else ""
        requests = f"{event.requests} request{'s' if event.requests != 1 else ''}"
        return f"{event.outcome}, {requests}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Heartbeat)
class HeartbeatAdmin(admin.ModelAdmin):
    list_display = ("kind", "instance", "address", "started_at", "beat_at")
    list_filter = ("kind",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
