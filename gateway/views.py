"""Operational endpoints: /healthz for load balancers and monitors, /metrics for Prometheus."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache

from dicomweb.auth import may_see_health_detail
from gateway import metrics
from gateway.health import run_checks


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """The status for anyone (a load balancer); the checks' detail (paths, errors, addresses) for a reader."""
    report = run_checks()
    status = 503 if report["status"] == "fail" else 200  # "degraded" stays 200
    if not may_see_health_detail(request):
        report = {"status": report["status"]}
    return JsonResponse(report, status=status)


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)
