"""Forwarding metrics: counters the delivery code increments, and queue gauges read at scrape time.

Counters and the histogram live in PROMETHEUS_MULTIPROC_DIR like every other
Isthmus metric (each worker writes, the web process sums). Queue depth and age
are not counted by anyone: the ForwardJob table is the truth, so a custom
collector asks it (one aggregate query) when /metrics is scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.db import connection
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

DELIVERIES = Counter(
    "isthmus_forward_deliveries_total",
    "Forward job delivery attempts, by destination and outcome (delivered, retry, dead).",
    ["destination", "outcome"],
)
LATENCY = Histogram(
    "isthmus_forward_latency_seconds",
    "Time from an instance being stored to its delivery being confirmed by the destination.",
    ["destination"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf")),
)
BYTES = Counter(
    "isthmus_forward_bytes_total",
    "Bytes of instances delivered, by destination.",
    ["destination"],
)


def record_outcome(destination: str, outcome: str, *, count: int = 1) -> None:
    """Count `count` jobs of one batch that ended an attempt with `outcome` (delivered, retry, dead)."""
    DELIVERIES.labels(destination=destination, outcome=outcome).inc(count)


def record_delivered(destination: str, *, latency_seconds: float, size: int) -> None:
    """One job delivered: its latency since it was stored, and its bytes (the outcome is counted too)."""
    DELIVERIES.labels(destination=destination, outcome="delivered").inc()
    LATENCY.labels(destination=destination).observe(max(0.0, latency_seconds))
    BYTES.labels(destination=destination).inc(size)


class QueueCollector(Collector):
    """Queue depth, dead letters and oldest pending age per destination, from the database at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from routing.selectors import destination_backlogs_by_name

        depth = GaugeMetricFamily(
            "isthmus_forward_queue_depth", "Forward jobs pending, by destination.", labels=["destination"]
        )
        dead = GaugeMetricFamily(
            "isthmus_forward_dead_letters", "Forward jobs dead (given up), by destination.", labels=["destination"]
        )
        age = GaugeMetricFamily(
            "isthmus_forward_oldest_pending_age_seconds",
            "Age of the oldest pending forward job, by destination (0 when none is pending).",
            labels=["destination"],
        )
        try:
            rows = destination_backlogs_by_name()
        except Exception as exc:  # the scrape must answer even when the database does not
            connection.close()
            logger.warning("forward queue metrics unavailable: %s", exc)
            return
        for name, (pending, dead_count, age_seconds) in rows.items():
            depth.add_metric([name], pending)
            dead.add_metric([name], dead_count)
            age.add_metric([name], age_seconds)
        yield depth
        yield dead
        yield age
