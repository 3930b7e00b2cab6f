"""REST API for orders: create, change and cancel orders without HL7, e.g. from a RIS script.

Orders are clinical data, not configuration: a token with worklist scope changes them (read scope
reads them), so a RIS script needs no admin scope, and an admin token no patient data.
"""

from __future__ import annotations

from rest_framework import decorators, exceptions, response, routers, serializers, status, viewsets

from dicomweb.auth import WorklistScope
from worklist import services
from worklist.errors import DUPLICATE_KEY, WorklistError
from worklist.models import Order, Patient, ScheduledStep


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflicts with an existing order"


def _api_error(exc: WorklistError) -> exceptions.APIException:
    if exc.code == DUPLICATE_KEY:
        return Conflict(exc.text)
    return exceptions.ValidationError({"detail": exc.text})


class PatientSerializer(serializers.ModelSerializer):
    class Meta:
        model = Patient
        fields = ["patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex"]
        extra_kwargs = {"patient_id": {"validators": []}, "issuer_of_patient_id": {"validators": []}}
        validators: list = []  # (ID, issuer) is an upsert key here, not a uniqueness check


class ScheduledStepSerializer(serializers.ModelSerializer):
    class Meta:
        model = ScheduledStep
        fields = ["step_id", "modality", "station_ae_title", "station_name", "location", "start_date", "start_time",
                  "performing_physician_name", "description", "protocol_codes", "status"]  # fmt: skip
        read_only_fields = ["status"]
        extra_kwargs = {"step_id": {"required": False}}


class OrderSerializer(serializers.ModelSerializer):
    patient = PatientSerializer()
    steps = ScheduledStepSerializer(many=True, required=False)

    class Meta:
        model = Order
        fields = ["id", "patient", "accession_number", "issuer_of_accession_number", "requested_procedure_id",
                  "requested_procedure_description", "requested_procedure_code", "requested_procedure_priority",
                  "reason_for_requested_procedure", "placer_order_number", "filler_order_number",
                  "referring_physician_name", "requesting_physician", "admission_id", "current_patient_location",
                  "study_instance_uid", "status", "source", "steps", "created_at", "updated_at"]  # fmt: skip
        read_only_fields = ["id", "study_instance_uid", "status", "source", "created_at", "updated_at"]
        validators: list = []  # a duplicate accession is the service's 409, not a 400

    def create(self, validated: dict) -> Order:
        patient_data, steps = validated.pop("patient"), validated.pop("steps", [])
        try:
            patient = services.upsert_patient(demographics=patient_data)
            return services.create_order(patient=patient, order=validated, steps=steps, source=Order.Source.API)
        except WorklistError as exc:
            raise _api_error(exc) from exc

    def update(self, order: Order, validated: dict) -> Order:
        patient_data, steps = validated.pop("patient", None), validated.pop("steps", None)
        try:
            patient = services.upsert_patient(demographics=patient_data) if patient_data else None
            return services.change_order(order=order, changes=validated, steps=steps, patient=patient)
        except WorklistError as exc:
            raise _api_error(exc) from exc


class OrderViewSet(viewsets.ModelViewSet):
    """Orders with their steps; DELETE is not offered: cancel instead, the order stays for the record."""

    serializer_class = OrderSerializer
    permission_classes = [WorklistScope]
    http_method_names = ["get", "post", "put", "patch", "head", "options"]

    def get_queryset(self):
        orders = Order.objects.select_related("patient").prefetch_related("steps").order_by("-pk")
        for name in ("accession_number", "status", "source"):
            if self.request.query_params.get(name):
                orders = orders.filter(**{name: self.request.query_params[name]})
        return orders

    @decorators.action(detail=True, methods=["post"])
    def cancel(self, request, pk: str | None = None) -> response.Response:
        """Cancel (default) or discontinue: {"status": "DISCONTINUED"}; the steps leave the worklist."""
        wanted = request.data.get("status", Order.Status.CANCELED)
        if wanted not in (Order.Status.CANCELED, Order.Status.DISCONTINUED):
            raise exceptions.ValidationError({"status": "CANCELED or DISCONTINUED"})
        try:
            order = services.cancel_order(order=self.get_object(), status=wanted)
        except WorklistError as exc:
            raise Conflict(exc.text) from exc
        return response.Response(OrderSerializer(order).data)


router = routers.DefaultRouter()
router.register("orders", OrderViewSet, basename="order")
