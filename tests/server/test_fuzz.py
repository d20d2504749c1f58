"""Fuzz every operation of the explorer's OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def fuzz_app(tiny_loaded):
    from convscope.server import Settings, create_app

    return create_app(Settings(models={"tiny": tiny_loaded}, max_upload_bytes=4096,
                               max_pixels=200_000, max_channels=64, max_tile=64,
                               # schemathesis' ASGI client sends Host: testserver
                               allowed_hosts=["localhost", "testserver"]))


def test_no_server_errors(fuzz_app):
    """Every operation of the schema, with bounded hypothesis-generated cases (schemathesis'
    own pytest plugin is not used: it does not run on this pytest version)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.query,
                                                response.text[:300])

        check()


def test_known_values_never_500(fuzz_app):
    """A deterministic sweep with valid names mixed with odd values."""
    from fastapi.testclient import TestClient

    odd = ["", "0", "-1", "sample:chelsea", "features.0", "features", "fc", "..", "%00", "é"]
    with TestClient(fuzz_app, base_url=LOCAL) as client:
        for layer in odd:
            for image in ("sample:chelsea", "sample:", "file:", "upload:"):
                for route in ("/api/grid", "/api/grid.png", "/api/channel"):
                    response = client.get(route, params={"image": image, "layer": layer,
                                                         "channel": 1})
                    assert response.status_code < 500, (route, image, layer, response.text)
        response = client.get("/api/grid.png", params={"image": "sample:chelsea",
                                                       "layer": "features.0"})
        assert response.status_code == 200
