"""A small archive for the DICOMweb read tests: instances stored through store.save(), and a real client."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from django.db import connections
from pydicom.uid import generate_uid

from dicomweb.models import ApiToken
from gateway import store
from tests.gateway.instances import make_instance


def save(path: Path) -> None:
    with path.open("rb") as source:
        result = store.save(source=source, calling_ae="CT1", called_ae="ISTHMUS")
    assert result.ok, result.reason


@dataclass
class Study:
    """A stored study: its UID, its series UIDs and the sent files by SOP Instance UID."""

    uid: str
    series: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def store_study(
    folder: Path, template: str, *, series: int = 1, per_series: int = 1, modalities: tuple = (), **attributes
) -> Study:
    """Make and store a study of `series` x `per_series` copies of pydicom's `template`."""
    study = Study(generate_uid())
    for series_index in range(series):
        series_uid = generate_uid()
        study.series.append(series_uid)
        extra = dict(attributes)
        if modalities:
            extra["Modality"] = modalities[series_index]
        for number in range(1, per_series + 1):
            path = make_instance(
                template,
                folder,
                study_uid=study.uid,
                series_uid=series_uid,
                SeriesNumber=series_index + 1,
                InstanceNumber=number,
                **extra,
            )
            save(path)
            study.files[path.stem] = path
    return study


def client(live_server, token: str | None = None) -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return DICOMwebClient(url=f"{live_server.url}/dicomweb", headers=headers)


def reader_token() -> str:
    """A fresh read-scope token (names are unique, so each call makes a new one)."""
    return ApiToken.issue(f"viewer-{uuid.uuid4().hex[:8]}", read=True)[1]


@pytest.fixture
def short_db_connections():
    """The live server's request threads close their database connections (CONN_MAX_AGE=0) so teardown can drop
    the test database; the settings dict is shared by every thread's connection."""
    database = connections.settings["default"]
    kept = database.get("CONN_MAX_AGE", 0)
    database["CONN_MAX_AGE"] = 0
    yield
    database["CONN_MAX_AGE"] = kept
