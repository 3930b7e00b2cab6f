"""Worklist rows for tests, written directly (the HL7 side has its own tests)."""

from __future__ import annotations

import itertools

from pydicom.uid import generate_uid

from worklist.models import Order, Patient, ScheduledStep

_numbers = itertools.count(1)


def patient(**fields) -> Patient:
    number = next(_numbers)
    defaults = {"patient_id": f"PID{number}", "patient_name": f"PATIENT^{number}", "patient_sex": "O"}
    return Patient.objects.create(**{**defaults, **fields})


def order(patient_row: Patient | None = None, **fields) -> Order:
    number = next(_numbers)
    defaults = {
        "accession_number": f"ACC{number}",
        "requested_procedure_id": f"RP{number}",
        "requested_procedure_description": "CT HEAD",
        "study_instance_uid": generate_uid(),
    }
    return Order.objects.create(patient=patient_row or patient(), **{**defaults, **fields})


def step(order_row: Order | None = None, **fields) -> ScheduledStep:
    number = next(_numbers)
    defaults = {
        "step_id": f"SPS{number}",
        "station_ae_title": "CT1",
        "modality": "CT",
        "start_date": "20240301",
        "start_time": "090000",
        "description": "CT head without contrast",
    }
    return ScheduledStep.objects.create(order=order_row or order(), **{**defaults, **fields})


def scheduled(*, patient_fields: dict | None = None, order_fields: dict | None = None, **step_fields) -> ScheduledStep:
    """A patient, an order and one scheduled step in one call."""
    return step(order(patient(**(patient_fields or {})), **(order_fields or {})), **step_fields)
