"""PS3.18 8.9 "Retrieve Capabilities": what this origin server offers, as JSON or WADL.

GET /dicomweb/ (or OPTIONS) answers the list of resources, their methods and
transactions, the media types and the STOW-RS caps. JSON by default;
WADL (application/vnd.sun.wadl+xml) when the Accept header asks for it.
"""

from __future__ import annotations

from xml.etree import ElementTree

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.urls import reverse

from dicomweb.base import DicomWebView

WADL = "application/vnd.sun.wadl+xml"
WADL_NS = "http://wadl.dev.java.net/2009/02"
S = "studies/{study}"
SE = f"{S}/series/{{series}}"
INST = f"{SE}/instances/{{instance}}"

# (path relative to /dicomweb/, methods, transaction)
RESOURCES: list[tuple[str, tuple[str, ...], str]] = [
    ("studies", ("GET", "POST"), "QIDO-RS search studies; STOW-RS store"),
    ("series", ("GET",), "QIDO-RS search series"),
    ("instances", ("GET",), "QIDO-RS search instances"),
    (f"{S}", ("GET", "POST"), "WADO-RS retrieve study; STOW-RS store into this study"),
    (f"{S}/metadata", ("GET",), "WADO-RS study metadata"),
    (f"{S}/series", ("GET",), "QIDO-RS search the study's series"),
    (f"{S}/instances", ("GET",), "QIDO-RS search the study's instances"),
    (f"{SE}", ("GET",), "WADO-RS retrieve series"),
    (f"{SE}/metadata", ("GET",), "WADO-RS series metadata"),
    (f"{SE}/instances", ("GET",), "QIDO-RS search the series' instances"),
    (f"{INST}", ("GET",), "WADO-RS retrieve instance"),
    (f"{INST}/metadata", ("GET",), "WADO-RS instance metadata"),
    (f"{INST}/frames/{{frames}}", ("GET",), "WADO-RS retrieve frames"),
    (f"{INST}/bulkdata/{{tag}}", ("GET",), "WADO-RS retrieve bulk data"),
    (f"{INST}/rendered", ("GET",), "WADO-RS rendered instance"),
    (f"{INST}/frames/{{frames}}/rendered", ("GET",), "WADO-RS rendered frames"),
]


def describe(base_url: str) -> dict:
    """The capabilities document as plain data (JSON)."""
    authentication = ["Authorization: Bearer <API token> (manage.py create_token)"]
    if settings.JWT_PUBLIC_KEY:
        authentication.append("Authorization: Bearer <JWT> with scope dicomweb.read and/or dicomweb.write")
    return {
        "service": "Isthmus DICOMweb",
        "standard": "DICOM PS3.18",
        "base": base_url,
        "authentication": authentication,
        "resources": [
            {"path": path, "methods": list(methods), "transaction": transaction}
            for path, methods, transaction in RESOURCES
        ],
        "stow": {
            "mediaTypes": ['multipart/related; type="application/dicom"', "application/dicom"],
            "maxBytes": settings.STOW_MAX_BYTES,
            "maxParts": settings.STOW_MAX_PARTS,
            "response": "application/dicom+json",
        },
    }


def wadl(base_url: str) -> bytes:
    """The same resources as a WADL application document (PS3.18 8.9.1)."""
    ElementTree.register_namespace("", WADL_NS)
    application = ElementTree.Element(f"{{{WADL_NS}}}application")
    resources = ElementTree.SubElement(application, f"{{{WADL_NS}}}resources", base=base_url)
    for path, methods, transaction in RESOURCES:
        resource = ElementTree.SubElement(resources, f"{{{WADL_NS}}}resource", path=path)
        ElementTree.SubElement(resource, f"{{{WADL_NS}}}doc").text = transaction
        for method in methods:
            ElementTree.SubElement(resource, f"{{{WADL_NS}}}method", name=method)
    return ElementTree.tostring(application, encoding="utf-8", xml_declaration=True)


class Capabilities(DicomWebView):
    """GET or OPTIONS /dicomweb/: the service's resources (read scope, like every DICOMweb read)."""

    def get(self, request) -> HttpResponse:
        base_url = request.build_absolute_uri(reverse("dicomweb-capabilities"))
        if WADL in request.META.get("HTTP_ACCEPT", ""):
            return HttpResponse(wadl(base_url), content_type=WADL)
        return JsonResponse(describe(base_url))

    def options(self, request, *args, **kwargs) -> HttpResponse:
        response = self.get(request)
        response["Allow"] = "GET, OPTIONS"
        return response


def api_endpoints_only(endpoints: list, **kwargs) -> list:
    """drf-spectacular hook: the OpenAPI schema covers /api/; DICOMweb is described by PS3.18 and /dicomweb/."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/api/")]
