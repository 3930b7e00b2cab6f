"""Admin pages: nodes, associations, processes, the instance index, commitment reports, the dashboard."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError
from django.db.models import Count, OuterRef, Prefetch, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from gateway import commitment, dashboard, services, web_limits
from gateway.models import (
    AssociationEvent,
    AuditEvent,
    CommitmentRequest,
    Heartbeat,
    Hl7Refusal,
    Hl7Sender,
    Instance,
    Node,
    Series,
    Study,
)

admin.site.site_header = "Isthmus DICOM gateway"
admin.site.site_title = "Isthmus"
admin.site.index_title = "Administration"


class LimitedLoginForm(AdminAuthenticationForm):
    """The admin login, refused without checking the password while the address or user name is over its limit."""

    def clean(self) -> dict:
        address = web_limits.client_address(self.request)
        wait = web_limits.login_blocked(address, self.cleaned_data.get("username") or "")
        if wait:
            minutes = -(-wait // 60)
            raise ValidationError(
                f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}.", code="throttled"
            )
        return super().clean()  # a wrong password sends user_login_failed, which web_limits counts


admin.site.login_form = LimitedLoginForm


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

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # the record of who connected; only retention (ISTHMUS_EVENT_RETENTION_DAYS) prunes it


@admin.register(Heartbeat)
class HeartbeatAdmin(admin.ModelAdmin):
    list_display = ("kind", "instance", "address", "started_at", "beat_at")
    list_filter = ("kind",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


# --- The instance index: read-only, the store writes it ---------------------------


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the gateway itself: shown, never edited or deleted here."""

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # deleting must go through the store, which owns the files


class StudyDateFilter(admin.SimpleListFilter):
    """Study Date is a DICOM DA string (YYYYMMDD), so ranges are string comparisons."""

    title = "study date"
    parameter_name = "study_date"
    RANGES = {"today": 0, "7d": 7, "30d": 30, "365d": 365}

    def lookups(self, request: HttpRequest, model_admin) -> list[tuple[str, str]]:
        return [("today", "Today"), ("7d", "Past 7 days"), ("30d", "Past 30 days"), ("365d", "Past year")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        days = self.RANGES.get(self.value() or "")
        if days is None:
            return queryset
        today = timezone.localdate()
        return queryset.filter(study_date__gte=(today - timedelta(days=days)).strftime("%Y%m%d"))


class ModalityFilter(admin.SimpleListFilter):
    """Studies with at least one series of the modality (a subquery: no join that would skew the counts)."""

    title = "modality"
    parameter_name = "modality"

    def lookups(self, request: HttpRequest, model_admin) -> list[tuple[str, str]]:
        modalities = Series.objects.exclude(modality="").order_by("modality").values_list("modality", flat=True)
        return [(m, m) for m in modalities.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        return queryset.filter(pk__in=Series.objects.filter(modality=self.value()).values("study_id"))


class SeriesInline(admin.TabularInline):
    model = Series
    fields = ("series_number", "modality", "series_description", "body_part_examined", "instance_count",
              "series_size", "instances_link")  # fmt: skip
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(instance_total=Count("instances"), size_total=Sum("instances__size"))
            .order_by("series_number", "pk")
        )

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description="instances")
    def instance_count(self, series: Series) -> int:
        return series.instance_total

    @admin.display(description="size")
    def series_size(self, series: Series) -> str:
        return filesizeformat(series.size_total or 0)

    @admin.display(description="")
    def instances_link(self, series: Series) -> str:
        url = reverse("admin:gateway_instance_changelist") + f"?series__id__exact={series.pk}"
        return format_html('<a href="{}">instance list</a>', url)


@admin.register(Study)
class StudyAdmin(ReadOnlyAdmin):
    list_display = ("patient_display", "patient_id", "study_date", "modalities", "accession_number",
                    "calling_ae", "instance_count", "study_size", "received_at", "study_instance_uid")  # fmt: skip
    list_display_links = ("patient_display",)
    list_filter = (StudyDateFilter, ModalityFilter, "calling_ae", ("received_at", admin.DateFieldListFilter))
    search_fields = ("=accession_number", "=patient__patient_id", "=study_instance_uid")
    list_select_related = ("patient",)
    show_full_result_count = False
    date_hierarchy = None
    ordering = ("-received_at",)
    inlines = [SeriesInline]
    readonly_fields = ("study_instance_uid", "patient_display", "patient_id", "study_date", "study_time",
                       "accession_number", "study_id", "study_description", "referring_physician_name",
                       "calling_ae", "received_at", "updated_at")  # fmt: skip
    fields = readonly_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # Counts and sizes as correlated subqueries: computed for the rows on the page
        # only, and dropped from the paginator's COUNT. Modalities come from one prefetch.
        instances = Instance.objects.filter(series__study=OuterRef("pk")).order_by().values("series__study")
        return (
            super()
            .get_queryset(request)
            .annotate(
                instance_total=Coalesce(Subquery(instances.annotate(n=Count("pk")).values("n")), 0),
                size_total=Coalesce(Subquery(instances.annotate(n=Sum("size")).values("n")), 0),
            )
            .prefetch_related(Prefetch("series", queryset=Series.objects.only("pk", "study_id", "modality")))
        )

    @admin.display(description="patient", ordering="patient__patient_name")
    def patient_display(self, study: Study) -> str:
        return study.patient.patient_name.replace("^", " ").strip()

    @admin.display(description="patient ID", ordering="patient__patient_id")
    def patient_id(self, study: Study) -> str:
        return study.patient.patient_id

    @admin.display(description="modalities")
    def modalities(self, study: Study) -> str:
        return ", ".join(sorted({series.modality for series in study.series.all() if series.modality}))

    @admin.display(description="instances", ordering="instance_total")
    def instance_count(self, study: Study) -> str:
        url = reverse("admin:gateway_instance_changelist") + f"?series__study__id__exact={study.pk}"
        return format_html('<a href="{}">{}</a>', url, study.instance_total)

    @admin.display(description="size", ordering="size_total")
    def study_size(self, study: Study) -> str:
        return filesizeformat(study.size_total or 0)


@admin.register(Instance)
class InstanceAdmin(ReadOnlyAdmin):
    list_display = ("sop_instance_uid", "series_uid", "modality", "instance_number", "sop_class_uid",
                    "transfer_syntax_uid", "instance_size", "calling_ae", "source", "received_at")  # fmt: skip
    list_filter = ("source", "series__modality", "calling_ae")
    search_fields = ("=sop_instance_uid", "=series__series_instance_uid", "=series__study__study_instance_uid")
    list_select_related = ("series",)
    show_full_result_count = False
    ordering = ("series_id", "instance_number", "pk")
    readonly_fields = ("sop_instance_uid", "series", "sop_class_uid", "instance_number", "transfer_syntax_uid",
                       "number_of_frames", "rows", "columns", "bits_allocated", "content_date", "content_time",
                       "path", "size", "sha256", "calling_ae", "called_ae", "source", "received_at")  # fmt: skip
    fields = readonly_fields

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # The links from a study and from its series.
        return lookup in ("series__study__id__exact", "series__id__exact") or super().lookup_allowed(
            lookup, value, request
        )

    @admin.display(description="series", ordering="series__series_instance_uid")
    def series_uid(self, instance: Instance) -> str:
        return instance.series.series_instance_uid

    @admin.display(description="modality", ordering="series__modality")
    def modality(self, instance: Instance) -> str:
        return instance.series.modality

    @admin.display(description="size", ordering="size")
    def instance_size(self, instance: Instance) -> str:
        return filesizeformat(instance.size)


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("at", "action", "actor", "target", "detail")
    list_filter = ("action", ("at", admin.DateFieldListFilter))
    search_fields = ("=target", "actor")
    date_hierarchy = "at"


@admin.register(CommitmentRequest)
class CommitmentRequestAdmin(ReadOnlyAdmin):
    list_display = ("transaction_uid", "calling_ae", "node", "state", "referenced_count", "success_count",
                    "failed_count", "attempts", "next_attempt_at", "last_error_short", "received_at",
                    "delivered_at")  # fmt: skip
    list_filter = ("state", ("received_at", admin.DateFieldListFilter))
    search_fields = ("=transaction_uid", "calling_ae")
    list_select_related = ("node",)
    actions = ["retry_now"]
    readonly_fields = ("transaction_uid", "node", "calling_ae", "peer_address", "state", "attempts",
                       "next_attempt_at", "last_error", "received_at", "delivered_at", "referenced", "success",
                       "failed")  # fmt: skip
    fields = readonly_fields

    @admin.display(description="referenced")
    def referenced_count(self, request: CommitmentRequest) -> int:
        return len(request.referenced or [])

    @admin.display(description="committed")
    def success_count(self, request: CommitmentRequest) -> int:
        return len(request.success or [])

    @admin.display(description="failed")
    def failed_count(self, request: CommitmentRequest) -> int:
        return len(request.failed or [])

    @admin.display(description="last error")
    def last_error_short(self, request: CommitmentRequest) -> str:
        if not request.last_error:
            return ""
        return format_html('<span title="{}" style="color:#ba2121">{}</span>', request.last_error,
                           request.last_error[:60])  # fmt: skip

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("gateway.change_commitmentrequest")

    @admin.action(description="Retry now: send the report again on a new association", permissions=["retry"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[CommitmentRequest]) -> None:
        count = commitment.retry_now(commitment_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} commitment report(s) queued for delivery.", messages.SUCCESS)


# --- HL7 senders: who may send to the HL7 port, and who was refused ----------------------


class MessageTypesField(forms.CharField):
    """The allowed message types typed as "ORM^O01, ADT^A08" (blank: all), kept as a list."""

    def prepare_value(self, value: object) -> object:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: object) -> list[str]:
        text = super().to_python(value)
        return [item for item in text.replace(",", " ").split() if item]


class Hl7SenderForm(forms.ModelForm):
    message_types = MessageTypesField(
        required=False,
        help_text="Comma-separated, e.g. ORM^O01, ADT^A08; blank allows every type Isthmus handles.",
    )

    class Meta:
        model = Hl7Sender
        fields = ("name", "host", "message_types", "description", "enabled")


@admin.register(Hl7Sender)
class Hl7SenderAdmin(admin.ModelAdmin):
    form = Hl7SenderForm
    list_display = ("name", "host", "types", "enabled", "last_seen", "description")
    list_filter = ("enabled",)
    search_fields = ("name", "host", "description")
    readonly_fields = ("last_seen_at", "last_seen_address", "created_at", "updated_at")
    fieldsets = ((None, {"fields": Hl7SenderForm.Meta.fields}), ("Status", {"fields": readonly_fields}))

    @admin.display(description="message types")
    def types(self, sender: Hl7Sender) -> str:
        return ", ".join(sender.message_types) or "all"

    @admin.display(description="last seen", ordering="last_seen_at")
    def last_seen(self, sender: Hl7Sender) -> str:
        if sender.last_seen_at is None:
            return "never"
        return f"{timesince(sender.last_seen_at)} ago from {sender.last_seen_address}"


@admin.register(Hl7Refusal)
class Hl7RefusalAdmin(ReadOnlyAdmin):
    list_display = ("last_at", "peer_address", "reason", "message_type", "control_id", "count", "sender", "first_at")
    list_filter = ("reason", ("last_at", admin.DateFieldListFilter))
    search_fields = ("peer_address", "control_id")
    list_select_related = ("sender",)


# --- The dashboard above the app list (templates/admin/index.html) -------------------


_plain_index = admin.site.index


def index_with_dashboard(request: HttpRequest, extra_context: dict | None = None) -> TemplateResponse:
    """The admin index, with dashboard.summary() for the template."""
    return _plain_index(request, extra_context={"dashboard": dashboard.summary(), **(extra_context or {})})


admin.site.index = index_with_dashboard  # read by admin.site.get_urls(), after admin autodiscovery
