"""The service describes itself: PS3.18 retrieve capabilities (JSON or WADL) and the OpenAPI schema of /api/."""

from __future__ import annotations

from xml.etree import ElementTree

import pytest
import requests

from tests.dicomweb.access import bearer

WADL_NS = "{http://wadl.dev.java.net/2009/02}"


@pytest.fixture
def reader(transactional_db) -> dict[str, str]:
    return bearer(write=False)


def test_capabilities_as_json(live_server, reader, settings):
    settings.STOW_MAX_PARTS = 123

    response = requests.get(f"{live_server.url}/dicomweb/", headers=reader, timeout=10)

    assert response.status_code == 200
    document = response.json()
    resources = {resource["path"]: resource["methods"] for resource in document["resources"]}
    assert resources["studies"] == ["GET", "POST"]
    assert resources["studies/{study}"] == ["GET", "POST"]
    assert "GET" in resources["studies/{study}/series/{series}/instances/{instance}/frames/{frames}"]
    assert document["stow"]["maxParts"] == 123
    assert document["base"] == f"{live_server.url}/dicomweb/"


def test_capabilities_as_wadl_and_on_options(live_server, reader):
    wadl = requests.get(
        f"{live_server.url}/dicomweb/", headers={**reader, "Accept": "application/vnd.sun.wadl+xml"}, timeout=10
    )
    options = requests.options(f"{live_server.url}/dicomweb/", headers=reader, timeout=10)

    assert wadl.headers["Content-Type"] == "application/vnd.sun.wadl+xml"
    root = ElementTree.fromstring(wadl.content)
    studies = root.find(f"{WADL_NS}resources/{WADL_NS}resource[@path='studies']")
    assert [method.get("name") for method in studies.findall(f"{WADL_NS}method")] == ["GET", "POST"]
    assert options.status_code == 200
    assert options.json()["resources"][0]["path"] == "studies"


def test_capabilities_need_a_token(live_server, transactional_db):
    assert requests.get(f"{live_server.url}/dicomweb/", timeout=10).status_code == 401


def test_openapi_schema_covers_the_rest_api(live_server, reader):
    response = requests.get(f"{live_server.url}/api/schema/?format=json", headers=reader, timeout=30)
    anonymous = requests.get(f"{live_server.url}/api/schema/", timeout=30)

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert "/api/nodes/" in schema["paths"] and "/api/worklist/orders/" in schema["paths"]
    assert not [path for path in schema["paths"] if path.startswith("/dicomweb")]
    assert anonymous.status_code in (401, 403)
