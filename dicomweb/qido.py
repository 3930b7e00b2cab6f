"""QIDO-RS views (PS3.18 10.6): parse, search the index, answer DICOM JSON. No match is 200 with []."""

from __future__ import annotations

import json

from django.http import HttpResponse

from dicomweb import accept, dicomjson, selectors
from dicomweb.base import DICOM_JSON, DicomWebError, DicomWebView, add_warnings, problem


def base_url(request) -> str:
    """The absolute root of our DICOMweb service, for RetrieveURL and BulkDataURI."""
    return request.build_absolute_uri("/dicomweb").rstrip("/")


class SearchView(DicomWebView):
    """GET a QIDO-RS resource; `level` says what is searched, the URL may fix the study and series."""

    level = selectors.STUDY

    def get(self, request, study: str = "", series: str = ""):
        ranges = accept.parse_accept(request.headers.get("Accept"))
        if not accept.accepts_any(ranges, DICOM_JSON, "application/json"):
            return problem(406, "QIDO-RS answers application/dicom+json")
        try:
            search = selectors.parse_search(self.level, dict(request.GET.lists()), study_uid=study, series_uid=series)
        except DicomWebError as exc:
            return problem(exc.status, exc.detail)
        rows, more = selectors.run_search(search)
        if more:
            search.warnings.append("There are additional results that can be requested (use offset).")
        root = base_url(request)
        body = [dicomjson.row_json(row, search.query.returned, level=self.level, base_url=root) for row in rows]
        response = HttpResponse(json.dumps(body), content_type=DICOM_JSON)
        return add_warnings(response, search.warnings)


class StudySearch(SearchView):
    level = selectors.STUDY


class SeriesSearch(SearchView):
    level = selectors.SERIES


class InstanceSearch(SearchView):
    level = selectors.IMAGE
