"""The fast path for the hot GET routes answers exactly as FastAPI does.

Two apps over the same models, one with the fast path and one without, get the same
requests; every answer (status, headers in order, body) must be identical, the fast path
must answer the plain valid ones itself, and everything unusual must reach FastAPI.
"""

from __future__ import annotations

import warnings
from typing import Annotated
from urllib.parse import quote

import pytest
from fastapi import FastAPI, Query, Request

from convscope.server import Settings, create_app
from convscope.server.fast import FastPath, NotUnderstood, hot_routes

LOCAL = "http://localhost"
#: One client id for both apps, so neither sets a (random) cookie in its answer.
COOKIE = {"convscope_client": "fast-path-test-client-0001"}
TINY = "model=tiny&image=sample:chelsea"
LITE = "image=sample:chelsea"

#: (method, path, query, answered by the fast path itself)
CASES = [
    # Valid: the fast path answers.
    ("GET", "/api/grid", f"{TINY}&layer=features.0", True),
    ("GET", "/api/grid", f"{TINY}&layer=features.2&normalize=layer&cmap=magma&sort=mean"
                         "&count=3&tile=16", True),
    ("GET", "/api/grid", f"{TINY}&layer=features.1&normalize=none&sort=max&count=1024", True),
    ("GET", "/api/grid", f"{TINY}&layer=features.3&sort=&tile=4", True),
    ("GET", "/api/grid", f"{LITE}&layer=_blocks.3&count=48&cmap=gray", True),
    ("GET", "/api/grid", f"{LITE}&model=&layer=_conv_stem", True),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0", True),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.2&normalize=layer&cmap=magma&sort=mean"
                             "&count=3&tile=16", True),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.1&normalize=none&tile=512", True),
    ("GET", "/api/grid.png", f"{LITE}&layer=_blocks.3&normalize=channel&cmap=inferno"
                             "&sort=max&count=16", True),
    ("GET", "/api/grid.png", f"layer=_conv_stem&{LITE}&count=7", True),
    ("GET", "/api/channel", f"{TINY}&layer=features.0&channel=5", True),
    ("GET", "/api/channel", f"{TINY}&layer=features.3&channel=0", True),
    ("GET", "/api/channel", f"{LITE}&layer=_blocks.3&channel=39", True),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1", True),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.2&channel=3&cmap=gray&size=16", True),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.1&channel=2&over=true&alpha=0.25",
     True),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.1&channel=2&over=1&alpha=1", True),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.1&channel=2&over=false&alpha=0",
     True),
    ("GET", "/api/channel.png", f"{LITE}&layer=_blocks.3&channel=7&size=1024", True),
    ("GET", "/api/filters.png", "model=tiny&layer=features.0", True),
    ("GET", "/api/filters.png", "model=tiny&layer=features.2&channel=3&tile=4", True),
    ("GET", "/api/filters.png", "model=tiny&layer=features.0&channel=0&count=2&tile=128",
     True),
    ("GET", "/api/filters.png", "layer=_conv_stem&channel=31", True),
    ("GET", "/api/filters.png", "layer=_blocks.1._expand_conv&channel=2", True),
    ("GET", "/api/filters.png", "layer=_conv_stem&count=8", True),
    # Values the fast path converts but the route refuses: FastAPI answers the error.
    ("GET", "/api/grid", f"{TINY}&layer=features.9", False),
    ("GET", "/api/grid", f"{TINY}&layer=fc", False),
    ("GET", "/api/grid.png", f"{TINY}&layer=pool", True),
    ("GET", "/api/grid", "model=nope&image=sample:chelsea&layer=features.0", False),
    ("GET", "/api/grid", "model=tiny&image=sample:nope&layer=features.0", False),
    ("GET", "/api/grid.png", "model=tiny&image=&layer=features.0", False),
    ("GET", "/api/grid", f"{TINY}&layer=", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&cmap=nocmap", True),  # JSON: no colours
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&cmap=nocmap", False),
    ("GET", "/api/channel", f"{TINY}&layer=features.0&channel=6", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=99", False),
    ("GET", "/api/filters.png", "model=tiny&layer=features.1&channel=0", False),
    ("GET", "/api/filters.png", "model=tiny&layer=features.0&channel=6", False),
    ("GET", "/api/filters.png", "model=tiny&layer=fc", False),
    # Not in the canonical form or out of bounds: FastAPI validates (or accepts) them.
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=05", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=+5", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=%205", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=5.0", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=0", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=1025", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=-1", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&count=99999999999999999999999", False),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&tile=3", False),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&tile=513", False),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&tile=", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&normalize=Channel", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&sort=min", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&cmap=" + "v" * 41, False),
    ("GET", "/api/grid", f"model=tiny&image={'s' * 201}&layer=features.0", False),
    ("GET", "/api/grid", f"{TINY}&layer={'l' * 301}", False),
    ("GET", "/api/channel", f"{TINY}&layer=features.0&channel=1000001", False),
    ("GET", "/api/channel", f"{TINY}&layer=features.0&channel=x", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&over=yes", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&over=True", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&over=", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&alpha=.5", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&alpha=1.5", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&alpha=nan", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&alpha=1e-1", False),
    ("GET", "/api/channel.png", f"{TINY}&layer=features.0&channel=1&size=15", False),
    ("GET", "/api/filters.png", "model=tiny&layer=features.0&tile=129", False),
    # Missing, unknown and repeated parameters.
    ("GET", "/api/grid", "model=tiny&layer=features.0", False),
    ("GET", "/api/grid.png", "", False),
    ("GET", "/api/channel", f"{TINY}&layer=features.0", False),
    ("GET", "/api/filters.png", "model=tiny", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&extra=1", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&layer=features.2", False),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&count=4&count=5", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&&", True),  # empty fields are skipped
    ("GET", "/api/grid", f"{TINY}&layer", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0;count=3", False),
    # Encodings: percent-escapes, '+' as space, bytes that are not UTF-8.
    ("GET", "/api/grid", f"{TINY}&layer=features%2E0&cmap=%76iridis", True),
    ("GET", "/api/grid", f"{TINY}&layer=features.0&cmap=vir+idis", True),
    ("GET", "/api/grid.png", f"{TINY}&layer=features.0&cmap=vir+idis", False),
    ("GET", "/api/grid", f"{TINY}&layer={quote('featurés.0')}", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.%FF0", False),
    ("GET", "/api/grid", f"{TINY}&layer=features.0%00", False),
    ("GET", "/api/grid", "model=tiny&image=sample%3Achelsea&layer=features.1", True),
    # Paths and methods the fast path leaves alone.
    ("GET", "/api/grid/", f"{TINY}&layer=features.0", False),
    ("GET", "/api/Grid", f"{TINY}&layer=features.0", False),
    ("GET", "/api/grid%2Epng", f"{TINY}&layer=features.0", True),
    ("HEAD", "/api/grid.png", f"{TINY}&layer=features.0", False),
    ("POST", "/api/grid", f"{TINY}&layer=features.0", False),
    ("DELETE", "/api/channel.png", f"{TINY}&layer=features.0&channel=1", False),
    ("OPTIONS", "/api/filters.png", "model=tiny&layer=features.0", False),
    ("GET", "/api/layers", "model=tiny", False),
]


class CountingApp:
    """Wraps the app behind the fast path and counts the requests that reach it."""

    def __init__(self, app):
        self.app = app
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await self.app(scope, receive, send)


def find_fast_path(app) -> FastPath:
    """The app's FastPath middleware (building the middleware stack if needed)."""
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = stack
    node = stack
    while node is not None:
        if isinstance(node, FastPath):
            return node
        node = getattr(node, "app", None)
    raise AssertionError("no FastPath in the app's middleware stack")


@pytest.fixture(scope="module")
def clients(lite0, tiny_loaded):
    from fastapi.testclient import TestClient

    models = {"efficientnet_lite0": lite0, "tiny": tiny_loaded}
    fast_app = create_app(Settings(models=models))
    plain_app = create_app(Settings(models=models, fast_path=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TestClient(fast_app, base_url=LOCAL, cookies=COOKIE) as fast, \
                TestClient(plain_app, base_url=LOCAL, cookies=COOKIE) as plain:
            counter = CountingApp(None)
            fast_path = find_fast_path(fast_app)
            counter.app, fast_path.app = fast_path.app, counter
            yield fast, plain, counter, fast_app, plain_app


def test_plain_app_has_no_fast_path(clients):
    *_, plain_app = clients
    with pytest.raises(AssertionError, match="no FastPath"):
        find_fast_path(plain_app)


@pytest.mark.parametrize(("method", "path", "query", "answered"), CASES,
                         ids=[f"{m} {p}?{q[:60]}" for m, p, q, _ in CASES])
def test_same_answer_as_fastapi(clients, method, path, query, answered):
    fast, plain, counter, *_ = clients
    url = path + ("?" + query if query else "")
    before = counter.calls
    got = fast.request(method, url)
    want = plain.request(method, url)
    assert got.status_code == want.status_code, (got.text[:300], want.text[:300])
    assert got.headers.raw == want.headers.raw
    assert got.content == want.content
    # Answered here (no call behind the fast path) exactly for the plain valid requests.
    assert counter.calls - before == (0 if answered else 1)
    if answered:
        assert got.status_code == 200


def test_cases_cover_every_hot_route_both_ways():
    for path in ("/api/grid", "/api/grid.png", "/api/channel", "/api/channel.png",
                 "/api/filters.png"):
        assert {answered for m, p, _, answered in CASES if p == path and m == "GET"} == {
            True, False}


def test_schema_is_unchanged(clients):
    *_, fast_app, plain_app = clients
    assert fast_app.openapi() == plain_app.openapi()
    routes = hot_routes(fast_app.routes)
    assert sorted(routes) == sorted(["/api/grid", "/api/grid.png", "/api/channel",
                                     "/api/channel.png", "/api/filters.png"])
    # The fast path calls the very functions FastAPI routes to, with their defaults.
    endpoints = {route.path: route.endpoint for route in fast_app.routes
                 if getattr(route, "methods", None) == {"GET"}}
    for path, route in routes.items():
        assert route.endpoint is endpoints[path]
    grid = routes["/api/grid"].arguments(b"image=a&layer=b")
    assert grid == {"image": "a", "layer": "b", "model": None, "normalize": "channel",
                    "cmap": "viridis", "sort": "", "count": 64, "tile": None}
    with pytest.raises(NotUnderstood):
        routes["/api/grid"].arguments(b"image=a&layer=b&count=64&count=64")


def test_guard_still_checks_fast_routes(tiny_loaded):
    """Host allow-list and token come before the fast path."""
    from fastapi.testclient import TestClient

    app = create_app(Settings(models={"tiny": tiny_loaded}, token="s3cret"))
    query = "/api/grid.png?image=sample:chelsea&layer=features.0"
    with TestClient(app, base_url=LOCAL) as client:
        refused = client.get(query)
        assert refused.status_code == 401
        assert refused.headers["x-frame-options"] == "DENY"
        allowed = client.get(query, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        assert allowed.headers["content-type"] == "image/png"
        assert allowed.headers["x-content-type-options"] == "nosniff"
        assert "convscope_client=" in allowed.headers["set-cookie"]
    with TestClient(app, base_url="http://evil.example") as client:
        assert client.get(query, headers={"Authorization": "Bearer s3cret"}).status_code == 421


def test_route_declarations_it_does_not_understand_are_left_to_fastapi():
    app = FastAPI()

    @app.get("/api/grid")
    def with_request(request: Request, layer: str) -> None: ...

    @app.get("/api/grid.png")
    def with_pattern(layer: Annotated[str, Query(pattern="^a")]) -> None: ...

    @app.get("/api/channel")
    def with_alias(layer: Annotated[str, Query(alias="l")]) -> None: ...

    @app.get("/api/channel.png")
    def with_list(layer: Annotated[list[str], Query()]) -> None: ...

    @app.get("/api/filters.png")
    def plain(layer: str, channel: int | None = None, alpha: float = 0.5) -> None: ...

    routes = hot_routes(app.routes)
    assert list(routes) == ["/api/filters.png"]
    assert routes["/api/filters.png"].arguments(b"layer=x&alpha=0.25") == {
        "layer": "x", "channel": None, "alpha": 0.25}


def test_fast_threads_below_one_are_refused_when_the_app_is_made(tiny_loaded):
    with pytest.raises(ValueError, match="fast_threads must be at least 1"):
        create_app(Settings(models={"tiny": tiny_loaded}, fast_threads=0))
