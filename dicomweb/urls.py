"""DICOMweb routes under /dicomweb/ (PS3.18): QIDO-RS, WADO-RS, STOW-RS."""

from django.urls import path

from dicomweb import capabilities, qido, wado
from dicomweb.stow import with_stow

S = "studies/<str:study>"
SE = f"{S}/series/<str:series>"
I = f"{SE}/instances/<str:instance>"  # noqa: E741

urlpatterns = [
    # --- QIDO-RS (search) ---
    path("studies", with_stow(qido.StudySearch.as_view()), name="qido-studies"),
    path("series", qido.SeriesSearch.as_view(), name="qido-series"),
    path("instances", qido.InstanceSearch.as_view(), name="qido-instances"),
    path(f"{S}/series", qido.SeriesSearch.as_view(), name="qido-study-series"),
    path(f"{S}/instances", qido.InstanceSearch.as_view(), name="qido-study-instances"),
    path(f"{SE}/instances", qido.InstanceSearch.as_view(), name="qido-series-instances"),
    # --- WADO-RS (retrieve) ---
    path(S, with_stow(wado.Retrieve.as_view()), name="wado-study"),
    path(SE, wado.Retrieve.as_view(), name="wado-series"),
    path(I, wado.Retrieve.as_view(), name="wado-instance"),
    path(f"{S}/metadata", wado.Metadata.as_view(), name="wado-study-metadata"),
    path(f"{SE}/metadata", wado.Metadata.as_view(), name="wado-series-metadata"),
    path(f"{I}/metadata", wado.Metadata.as_view(), name="wado-instance-metadata"),
    path(f"{I}/frames/<str:frame_list>", wado.Frames.as_view(), name="wado-frames"),
    path(f"{I}/bulkdata/<str:tag>", wado.BulkData.as_view(), name="wado-bulkdata"),
    path(f"{I}/rendered", wado.Rendered.as_view(), name="wado-rendered"),
    path(f"{I}/frames/<str:frame_list>/rendered", wado.Rendered.as_view(), name="wado-frames-rendered"),
    path(f"{S}/thumbnail", wado.Thumbnail.as_view(), name="wado-study-thumbnail"),
    path(f"{SE}/thumbnail", wado.Thumbnail.as_view(), name="wado-series-thumbnail"),
    path(f"{I}/thumbnail", wado.Thumbnail.as_view(), name="wado-instance-thumbnail"),
    # --- STOW-RS, capabilities (helper C2 adds its routes below this line) ---
    # POST studies and studies/{study} are STOW-RS: with_stow() above routes them by method.
    path("", capabilities.Capabilities.as_view(), name="dicomweb-capabilities"),
]
