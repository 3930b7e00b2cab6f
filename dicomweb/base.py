"""What every DICOMweb view shares: authentication, scopes, content negotiation done by hand, problem answers.

STOW-RS reuses DicomWebView with `permission_classes = [WriteScope]`.
"""

from __future__ import annotations

import logging

from django.http import HttpResponse, JsonResponse
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from dicomweb.auth import BearerTokenAuthentication, ReadScope, TooManyFailures

log = logging.getLogger("isthmus.dicomweb")

DICOM_JSON = "application/dicom+json"


class PassThroughNegotiation(BaseContentNegotiation):
    """DICOMweb media types (multipart/related; type=..., transfer-syntax=...) are negotiated by the views.

    DRF's own negotiation would refuse them with 406 before the view runs; its renderer only serves errors.
    """

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DicomWebView(APIView):
    """Base of QIDO-RS, WADO-RS and STOW-RS views: bearer token or staff session, read scope by default."""

    authentication_classes = [BearerTokenAuthentication, SessionAuthentication]
    permission_classes = [ReadScope]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = PassThroughNegotiation


class DicomWebError(Exception):
    """A request we answer with an RFC 9457 problem: raised by selectors and services, turned into a response."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


TITLES = {400: "Bad Request", 404: "Not Found", 406: "Not Acceptable", 410: "Gone", 429: "Too Many Requests",
          500: "Internal Server Error"}  # fmt: skip


def problem(status: int, detail: str) -> HttpResponse:
    """An application/problem+json answer; `detail` must hold no patient data (it is logged)."""
    log.info("dicomweb %d: %s", status, detail)
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    return JsonResponse(body, status=status, content_type="application/problem+json")


def exception_handler(exc: Exception, context: dict) -> HttpResponse | None:
    """DRF's handler for /api/ and /dicomweb/, except that a blocked source gets a problem with Retry-After."""
    if not isinstance(exc, TooManyFailures):
        return drf_exception_handler(exc, context)
    body = {"type": "about:blank", "title": TITLES[429], "status": 429, "detail": str(exc.detail)}
    response = JsonResponse(body, status=429, content_type="application/problem+json")
    response["Retry-After"] = str(int(exc.wait))
    response._has_been_logged = True  # not one django.request line per refusal: the block was logged once
    return response


def add_warnings(response: HttpResponse, warnings: list[str]) -> HttpResponse:
    """PS3.18 8.4.4 / RFC 7234 5.5: `Warning: 299 isthmus: "text"`, one header value per warning."""
    if warnings:
        response["Warning"] = ", ".join(f'299 isthmus "{text}"' for text in warnings)
    return response
