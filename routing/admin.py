"""The operators' view of routing: destinations with their queues, rules, forward jobs, and sending by hand.

Every figure comes from routing.selectors (shared with the dashboard and
/metrics); every action calls one function of routing.services.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db import connection, models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from gateway.admin import StudyAdmin
from gateway.models import Study
from routing import destinations, selectors, services
from routing.forms import DestinationForm, RuleForm, SendStudiesForm
from routing.models import DeliveryAttempt, Destination, ForwardJob, Rule


def _verify(destination: Destination) -> tuple[Destination, bool, str]:
    try:
        ok, message = services.verify_destination(destination)
        return destination, ok, message
    finally:
        connection.close()  # this ran in a pool thread


def _error_span(text: str, length: int = 60) -> str:
    if not text:
        return ""
    return format_html('<span title="{}" style="color:#ba2121">{}</span>', text, text[:length])


@admin.register(Destination)
class DestinationAdmin(admin.ModelAdmin):
    form = DestinationForm
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}  # a DICOMweb URL without scheme: https
    change_list_template = "admin/routing/destination/change_list.html"
    list_display = ("name", "kind", "target", "enabled", "paused", "jobs_link", "last_error_short")
    list_filter = ("kind", "enabled", "paused")
    search_fields = ("name", "description", "url", "node__name", "node__ae_title")
    list_select_related = ("node",)
    actions = ["verify", "pause", "resume", "redrive_dead"]
    readonly_fields = ("last_error", "last_error_at", "last_success_at", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "description", "enabled", "paused")}),
        ("DIMSE C-STORE", {"fields": ("node",)}),
        (
            "DICOMweb STOW-RS",
            {
                "fields": (
                    "url",
                    "auth",
                    "username",
                    "password",
                    "token",
                    "oauth_token_url",
                    "oauth_client_id",
                    "oauth_client_secret",
                    "oauth_scope",
                    "verify_tls",
                    "ca_bundle",
                    "connect_timeout",
                    "read_timeout",
                )
            },
        ),
        ("Flow control", {"fields": ("max_concurrency", "rate_instances", "rate_mbytes", "batch_size")}),
        (
            "Retry policy",
            {"fields": ("retry_attempts", "retry_first_delay", "retry_multiplier", "retry_max_delay", "retry_max_age")},
        ),
        ("Status", {"fields": readonly_fields}),
    )

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        # The queue table above the list: three aggregate queries for all destinations.
        extra = {"routing_stats": selectors.destination_stats(), **(extra_context or {})}
        try:
            return super().changelist_view(request, extra_context=extra)
        except destinations.DestinationInUse as exc:  # "delete selected": a job arrived after the confirmation
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    @admin.display(description="target")
    def target(self, destination: Destination) -> str:
        if destination.kind == Destination.Kind.DIMSE and destination.node:
            node = destination.node
            return f"{node.ae_title}@{node.host}:{node.port}"
        return destination.url

    @admin.display(description="jobs")
    def jobs_link(self, destination: Destination) -> str:
        url = reverse("admin:routing_forwardjob_changelist") + f"?destination__id__exact={destination.pk}"
        return format_html('<a href="{}">jobs</a>', url)

    @admin.display(description="last error")
    def last_error_short(self, destination: Destination) -> str:
        return _error_span(destination.last_error)

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("routing.change_destination")

    # --- Deleting: refused while a destination owes instances (routing/destinations.py) -------------

    def get_deleted_objects(self, objs, request: HttpRequest) -> tuple[list, dict, set, list]:
        """The confirmation page: counts rather than every finished job; what still owes instances is protected."""
        chosen = list(objs)
        ids = [destination.pk for destination in chosen]
        owed = destinations.owed_jobs(ids)
        protected = [str(destinations.DestinationInUse(d.name, *owed[d.pk])) for d in chosen if d.pk in owed]
        finished = destinations.finished_jobs(ids)
        deleted = [f"Destination: {destination.name}" for destination in chosen]
        if finished:
            deleted.append([f"{finished} delivered or cancelled forward job(s) and their attempts"])
        counts = {Destination._meta.verbose_name_plural: len(chosen), "finished forward jobs": finished}
        return deleted, counts, set(), protected

    def delete_model(self, request: HttpRequest, obj: Destination) -> None:
        destinations.delete_destination(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Destination]) -> None:
        for destination in queryset:
            destinations.delete_destination(destination)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict | None = None) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except destinations.DestinationInUse as exc:  # a job arrived between the confirmation and the delete
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(reverse("admin:routing_destination_change", args=[object_id]))

    @admin.action(description="Verify selected destinations (C-ECHO, or a DICOMweb request)")
    def verify(self, request: HttpRequest, queryset: QuerySet[Destination]) -> TemplateResponse:
        destinations = list(queryset.select_related("node"))
        # In parallel, so one unreachable destination does not hold up the rest.
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(destinations)))) as pool:
            results = list(pool.map(_verify, destinations))
        context = {
            **self.admin_site.each_context(request),
            "title": "Verify: destination results",
            "opts": self.model._meta,
            "results": results,
            "ok_count": sum(1 for _, ok, _ in results if ok),
        }
        return TemplateResponse(request, "admin/routing/destination/verify_results.html", context)

    @admin.action(description="Pause delivery to selected destinations", permissions=["operate"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Destination]) -> None:
        for destination in queryset:
            services.set_paused(destination, True)
        self.message_user(request, f"Paused {len(queryset)} destination(s); their jobs wait.", messages.SUCCESS)

    @admin.action(description="Resume delivery to selected destinations", permissions=["operate"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Destination]) -> None:
        for destination in queryset:
            services.set_paused(destination, False)
        self.message_user(request, f"Resumed {len(queryset)} destination(s).", messages.SUCCESS)

    @admin.action(description="Re-drive all dead letters of selected destinations", permissions=["operate"])
    def redrive_dead(self, request: HttpRequest, queryset: QuerySet[Destination]) -> None:
        count = sum(services.redrive_dead(destination) or 0 for destination in queryset)
        self.message_user(request, f"{count} dead job(s) queued for delivery again.", messages.SUCCESS)


@admin.register(Rule)
class RuleAdmin(admin.ModelAdmin):
    form = RuleForm
    list_display = ("name", "order", "enabled", "is_default", "stop", "conditions_display", "destination_names")
    list_display_links = ("name",)
    list_editable = ("order", "enabled")
    list_filter = ("enabled", "is_default", "destinations")
    search_fields = ("name", "description")
    filter_horizontal = ("destinations",)
    fields = ("name", "description", "order", "enabled", "is_default", "stop", "conditions", "destinations")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Rule]:
        return super().get_queryset(request).prefetch_related("destinations")

    @admin.display(description="conditions")
    def conditions_display(self, rule: Rule) -> str:
        if not rule.conditions:
            return "every instance"
        return format_html_join(", ", "<code>{}={}</code>", sorted(rule.conditions.items()))

    @admin.display(description="destinations")
    def destination_names(self, rule: Rule) -> str:
        return ", ".join(destination.name for destination in rule.destinations.all())


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    fields = ("at", "outcome", "status", "error", "seconds")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    ordering = ("-at",)


class DeadOrPendingFilter(admin.SimpleListFilter):
    """Shortcut for the question operators ask most: what is stuck?"""

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin) -> list[tuple[str, str]]:
        return [("retrying", "Pending after a failed attempt")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "retrying":
            return queryset.filter(state=ForwardJob.State.PENDING, attempts__gt=0)
        return queryset


@admin.register(ForwardJob)
class ForwardJobAdmin(admin.ModelAdmin):
    # What operators scan first on the left; the long UIDs (searchable) at the end.
    list_display = ("job_number", "destination", "state", "attempts", "next_attempt", "created_at",
                    "delivered_at", "last_error_short", "study_instance_uid", "sop_instance_uid")  # fmt: skip
    list_filter = ("state", "destination", DeadOrPendingFilter, ("created_at", admin.DateFieldListFilter))
    search_fields = ("=study_instance_uid", "=instance__sop_instance_uid")
    list_select_related = ("instance", "destination")
    show_full_result_count = False
    actions = ["retry", "cancel"]
    inlines = [DeliveryAttemptInline]
    readonly_fields = ("instance", "destination", "rule", "study_instance_uid", "size", "state", "attempts",
                       "next_attempt_at", "lease_until", "created_at", "delivered_at", "last_error")  # fmt: skip
    fields = readonly_fields

    @admin.display(description="job", ordering="pk")
    def job_number(self, job: ForwardJob) -> str:
        return f"#{job.pk}"

    @admin.display(description="next attempt", ordering="next_attempt_at")
    def next_attempt(self, job: ForwardJob):
        return job.next_attempt_at if job.state == ForwardJob.State.PENDING else None  # only a pending job has one

    @admin.display(description="SOP instance UID", ordering="instance__sop_instance_uid")
    def sop_instance_uid(self, job: ForwardJob) -> str:
        return job.instance.sop_instance_uid

    @admin.display(description="last error")
    def last_error_short(self, job: ForwardJob) -> str:
        return _error_span(job.last_error)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs come from rules and from "send to destination"

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("routing.change_forwardjob")

    @admin.action(description="Retry selected jobs now (dead or pending)", permissions=["operate"])
    def retry(self, request: HttpRequest, queryset: QuerySet[ForwardJob]) -> None:
        count = services.retry_jobs(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} job(s) queued for delivery now.", messages.SUCCESS)

    @admin.action(description="Cancel selected jobs (not yet delivered)", permissions=["operate"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[ForwardJob]) -> None:
        count = services.cancel_jobs(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} job(s) cancelled.", messages.SUCCESS)


# --- "Send to a destination" on the studies browser (gateway's StudyAdmin) ------------------


@admin.action(description="Send selected studies to a destination")
def send_to_destination(model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Study]):
    """First call shows a form choosing the destination; the form posts back here with `apply`."""
    if not request.user.has_perm("routing.add_forwardjob"):
        model_admin.message_user(request, "You may not queue forward jobs.", messages.ERROR)
        return None
    form = SendStudiesForm(request.POST if "apply" in request.POST else None)
    if form.is_valid():
        destination = form.cleaned_data["destination"]
        uids = list(queryset.values_list("study_instance_uid", flat=True))
        count = sum(services.send_study(uid, destination) or 0 for uid in uids)
        model_admin.message_user(
            request, f"{count} instance(s) of {len(uids)} study(ies) queued for {destination.name}.", messages.SUCCESS
        )
        return None
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Send studies to a destination",
        "opts": model_admin.model._meta,
        "form": form,
        "studies": queryset.select_related("patient"),
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
        "action": "send_to_destination",
    }
    return TemplateResponse(request, "admin/routing/send_studies.html", context)


# The studies browser belongs to gateway; routing adds its action to it rather than gateway knowing routing.
StudyAdmin.actions = [*(StudyAdmin.actions or []), send_to_destination]
