"""Modality worklist, HL7 orders and MPPS (issue 4)."""
