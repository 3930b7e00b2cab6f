"""Prometheus counters of the HL7 listener (summed with every other process's at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

MESSAGES = Counter(
    "isthmus_hl7_messages_total",
    "HL7 messages answered, by acknowledgement code and reason.",
    ["ack", "reason"],
)
CONNECTIONS = Counter(
    "isthmus_hl7_connections_total",
    "HL7 connections, by how they ended or why they were refused.",
    ["outcome"],
)
