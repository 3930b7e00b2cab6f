"""Prometheus metrics shared by every Isthmus process.

Processes write to PROMETHEUS_MULTIPROC_DIR (set in settings) and the web
process sums them for /metrics, so counters from the DIMSE listener and the
workers appear in one scrape.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

ASSOCIATIONS = Counter(
    "isthmus_dimse_associations_total",
    "DIMSE association requests, by result and reason.",
    ["result", "reason"],
)
DIMSE_REQUESTS = Counter(
    "isthmus_dimse_requests_total",
    "DIMSE requests served, by service and response status.",
    ["service", "status"],
)
DIMSE_REFUSED = Counter(
    "isthmus_dimse_refused_total",
    "Connections and associations the DIMSE port refused or cut short (caps, deadlines, oversized or malformed PDUs).",
    ["reason"],
)
ACTIVE_ASSOCIATIONS = Gauge(
    "isthmus_dimse_active_associations",
    "Associations currently open on the DIMSE listeners.",
    multiprocess_mode="livesum",
)


def render() -> tuple[bytes, str]:
    """The text exposition of every process's metrics, and its content type."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    from routing.metrics import QueueCollector  # routing's queue gauges, read from the database at scrape time

    registry.register(QueueCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


STORED_INSTANCES = Counter(
    "isthmus_store_instances_total",
    "Instances accepted by the store, by outcome (stored, duplicate, kept-first, replaced).",
    ["outcome"],
)
STORED_BYTES = Counter(
    "isthmus_store_bytes_total",
    "Bytes of instance files written to the store.",
)
STORE_FAILURES = Counter(
    "isthmus_store_failures_total",
    "Instances the store refused, by DICOM status.",
    ["status"],
)
