"""Admin for the worklist: orders typed by hand during RIS downtime, patients, and HL7/MPPS logs to read."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from worklist import services
from worklist.errors import WorklistError
from worklist.models import Hl7Message, Order, Patient, PerformedStep, ScheduledStep

PRIORITIES = [("", "---------")] + [(p, p) for p in ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")]


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex",
                    "merged_into", "updated_at")  # fmt: skip
    search_fields = ("patient_id", "patient_name")
    readonly_fields = ("merged_into", "created_at", "updated_at")


class ScheduledStepForm(forms.ModelForm):
    step_id = forms.CharField(max_length=16, required=False, help_text="left empty: 1, 2, ... in order")

    class Meta:
        model = ScheduledStep
        fields = ("step_id", "modality", "station_ae_title", "start_date", "start_time", "description",
                  "station_name", "location", "performing_physician_name", "status")  # fmt: skip


class ScheduledStepInline(admin.StackedInline):
    model = ScheduledStep
    form = ScheduledStepForm
    extra = 1
    min_num = 1


class OrderForm(forms.ModelForm):
    requested_procedure_priority = forms.ChoiceField(choices=PRIORITIES, required=False)

    class Meta:
        model = Order
        fields = "__all__"

    def clean(self) -> dict:
        cleaned = super().clean()
        accession_number = cleaned.get("accession_number")
        if accession_number:
            taken = Order.objects.filter(accession_number=accession_number).exclude(pk=self.instance.pk)
            if taken.exists():
                self.add_error("accession_number", "Another order has this accession number.")
        return cleaned


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    form = OrderForm
    inlines = [ScheduledStepInline]
    list_display = ("accession_number", "status", "patient_label", "procedure", "source", "created_at")
    list_filter = ("status", "source")
    search_fields = ("accession_number", "placer_order_number", "filler_order_number", "patient__patient_id")
    autocomplete_fields = ("patient",)
    readonly_fields = ("study_instance_uid", "status", "source", "created_at", "updated_at")
    actions = ["cancel_orders"]
    fieldsets = (
        (None, {"fields": ("patient", "accession_number", "issuer_of_accession_number", "requested_procedure_id",
                           "requested_procedure_description", "requested_procedure_priority",
                           "reason_for_requested_procedure")}),
        ("People and places", {"fields": ("referring_physician_name", "requesting_physician", "admission_id",
                                          "current_patient_location")}),
        ("Codes and order numbers", {"classes": ["collapse"], "fields": ("requested_procedure_code",
                                     "placer_order_number", "filler_order_number")}),
        ("Status", {"fields": readonly_fields}),
    )  # fmt: skip

    @admin.display(description="patient", ordering="patient__patient_name")
    def patient_label(self, order: Order) -> str:
        return f"{order.patient.patient_name} ({order.patient.patient_id})"

    @admin.display(description="procedure")
    def procedure(self, order: Order) -> str:
        return order.requested_procedure_description

    def get_queryset(self, request: HttpRequest) -> QuerySet[Order]:
        return super().get_queryset(request).select_related("patient")

    def save_model(self, request: HttpRequest, obj: Order, form, change: bool) -> None:
        if not change:
            services.prepare_new_order(order=obj, source=Order.Source.ADMIN)
        super().save_model(request, obj, form, change)

    def save_formset(self, request: HttpRequest, form, formset, change: bool) -> None:
        steps = formset.save(commit=False)
        for step in formset.deleted_objects:
            step.delete()
        taken = set(form.instance.steps.values_list("step_id", flat=True))
        for step in steps:
            if not step.step_id:
                step.step_id = services.next_step_id(taken)
            taken.add(step.step_id)
            step.save()
        formset.save_m2m()

    @admin.action(description="Cancel selected orders (their steps leave the worklist)")
    def cancel_orders(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        cancelled, refused = 0, []
        for order in queryset:
            try:
                services.cancel_order(order=order)
                cancelled += 1
            except WorklistError as exc:
                refused.append(exc.text)
        self.message_user(request, f"{cancelled} order(s) cancelled.", messages.SUCCESS)
        if refused:
            self.message_user(request, "Not cancelled: " + "; ".join(refused), messages.WARNING)


def _pre(text: str) -> str:
    return format_html('<pre style="white-space:pre-wrap">{}</pre>', text.replace("\r", "\n"))


@admin.register(Hl7Message)
class Hl7MessageAdmin(admin.ModelAdmin):
    list_display = ("received_at", "message_type", "control_id", "ack_code", "sending_application", "peer_address")
    list_filter = ("ack_code", "message_type")
    search_fields = ("control_id",)
    fields = ("received_at", "message_type", "control_id", "sending_application", "sending_facility",
              "peer_address", "ack_code", "error", "message", "acknowledgement")  # fmt: skip
    readonly_fields = fields

    @admin.display(description="message as received")
    def message(self, hl7_message: Hl7Message) -> str:
        return _pre(hl7_message.raw)

    @admin.display(description="ACK sent")
    def acknowledgement(self, hl7_message: Hl7Message) -> str:
        return _pre(hl7_message.ack)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(PerformedStep)
class PerformedStepAdmin(admin.ModelAdmin):
    list_display = ("sop_instance_uid", "status", "accession_number", "modality", "performed_station_ae_title",
                    "start_date", "start_time", "updated_at")  # fmt: skip
    list_filter = ("status", "modality")
    search_fields = ("accession_number", "sop_instance_uid", "study_instance_uid")
    exclude = ("scheduled_steps",)

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> list[str]:
        return [field.name for field in PerformedStep._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
