"""The explorer on a shared machine: Host allow-list, cross-site requests, token, per-client
uploads with unguessable ids, multipart uploads, security headers and byte-bounded caches."""

from __future__ import annotations

import http.client
import io
import re
import socket
import threading
import time

import pytest
from PIL import Image

from convscope.server.guard import host_name
from convscope.server.settings import Settings, is_loopback

#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def make_client(app, base_url: str = LOCAL):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=base_url)


@pytest.fixture(scope="module")
def tiny_app(tiny_loaded):
    from convscope.server import create_app

    return create_app(Settings(models={"tiny": tiny_loaded}))


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert host_name("[::1]:8000") == "::1"
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("::1") == "::1"
    assert Settings().hosts() == {"localhost", "127.0.0.1", "::1"}
    assert Settings(host="0.0.0.0").hosts() is None
    assert Settings(host="0.0.0.0", allowed_hosts=["Box.lan"]).hosts() == {"box.lan"}
    assert Settings(allowed_hosts=["*"]).hosts() is None


@pytest.mark.parametrize(("host", "status"), [
    ("localhost", 200), ("localhost:8000", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200),
    ("evil.example", 421), ("evil.example:8000", 421), ("127.0.0.1.evil.example", 421),
    ("", 421),
])
def test_host_allow_list(tiny_app, host, status):
    """DNS rebinding: a foreign Host header is refused by a loopback-bound server."""
    with make_client(tiny_app) as client:
        response = client.get("/api/models", headers={"Host": host})
        assert response.status_code == status, response.text
        if status == 421:
            assert "not served here" in response.json()["detail"]


def test_configured_hosts_when_not_loopback(tiny_loaded):
    from convscope.server import create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, host="0.0.0.0",
                              allowed_hosts=["box.lan"]))
    with make_client(app, "http://box.lan:8000") as client:
        assert client.get("/api/models").status_code == 200
        assert client.get("/api/models", headers={"Host": "localhost"}).status_code == 421


def test_uploads_need_an_image_type_or_multipart_and_same_origin(tiny_app):
    data = png_bytes((40, 30), (10, 200, 30))
    with make_client(tiny_app) as client:
        # A cross-site form can post text/plain without a preflight: refused.
        plain = client.post("/api/images", content=data, headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert "content type" in plain.json()["detail"]
        assert client.post("/api/images", content=data).status_code == 415  # no type at all
        # A request from another site's page (it carries that site's Origin): refused.
        cross = client.post("/api/images", content=data, headers={
            "Content-Type": "image/png", "Origin": "http://evil.example"})
        assert cross.status_code == 403
        assert client.post("/api/images", files={"file": ("x.png", data)},
                           headers={"Origin": "null"}).status_code == 403
        same = client.post("/api/images", content=data, headers={
            "Content-Type": "image/png", "Origin": "http://localhost"})
        assert same.status_code == 200
        # multipart/form-data (curl -F file=@x.png, HTML forms): same image, same id.
        form = client.post("/api/images", files={"file": ("photo.png", data, "image/png")})
        assert form.status_code == 200, form.text
        assert form.json() == same.json() == {"id": same.json()["id"], "width": 40,
                                              "height": 30}
        names = {row["id"]: row["name"] for row in client.get("/api/images").json()}
        assert names[form.json()["id"]] == "photo.png"
        empty_form = client.post("/api/images", data={"note": "no file"},
                                 files={"other": ("", b"")})
        assert empty_form.status_code in (400, 415)
        broken = client.post("/api/images", content=b"--x\r\nnot a form",
                             headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert broken.status_code == 400
        assert "multipart" in broken.json()["detail"]


def test_multipart_respects_the_byte_limit(tiny_loaded):
    from convscope.server import create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, max_upload_bytes=2000))
    big = png_bytes((300, 300), (1, 2, 3)) + b"\0" * 3000  # a valid PNG with trailing bytes
    with make_client(app) as client:
        response = client.post("/api/images", files={"file": ("big.png", big, "image/png")})
        assert response.status_code == 413
        small = client.post("/api/images", files={"file": ("s.png", png_bytes((8, 8), (0, 0, 0)))})
        assert small.status_code == 200


def test_upload_ids_are_unguessable_and_listed_per_client(tiny_app):
    data = png_bytes((33, 17), (250, 20, 20))
    with make_client(tiny_app) as alice, make_client(tiny_app) as bob:
        a = alice.post("/api/images", content=data, headers={"Content-Type": "image/png"})
        b = bob.post("/api/images", content=data, headers={"Content-Type": "image/png"})
        a_id, b_id = a.json()["id"], b.json()["id"]
        # 128 bits of a keyed hash, not the content hash anyone could compute.
        assert re.fullmatch(r"upload:[0-9a-f]{32}", a_id)
        import hashlib

        assert hashlib.sha256(data).hexdigest()[:16] not in a_id
        assert a_id != b_id
        assert a_id in {row["id"] for row in alice.get("/api/images").json()}
        assert a_id not in {row["id"] for row in bob.get("/api/images").json()}
        assert b_id not in {row["id"] for row in alice.get("/api/images").json()}
        # A shared link is a capability: Bob opens Alice's upload by its id.
        shown = bob.get("/api/input.png", params={"model": "tiny", "image": a_id})
        assert shown.status_code == 200
        assert bob.get("/api/input.png", params={
            "model": "tiny", "image": "upload:" + "0" * 32}).status_code == 404
    # Another app instance has another secret: the same client and bytes give another id.
    from convscope.server import create_app

    other = create_app(Settings(models={"tiny": tiny_app.state.convscope.models["tiny"].get()}))
    assert other.state.convscope.images.upload_id(data, "c") != \
        tiny_app.state.convscope.images.upload_id(data, "c")


def test_security_headers_and_favicon(tiny_app):
    with make_client(tiny_app) as client:
        for path in ("/", "/api/models", "/static/app.js", "/api/nope"):
            response = client.get(path)
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        icon = client.get("/favicon.ico")
        assert icon.status_code == 200
        assert icon.headers["content-type"] == "image/svg+xml"
        assert icon.content.startswith(b"<svg")
        assert "/favicon.ico" in client.get("/").text or icon.status_code == 200


def test_token_guards_every_api_call(tiny_loaded):
    from convscope.server import create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, host="0.0.0.0", token="s3cret-t0ken"))
    with make_client(app, "http://box.lan") as client:
        for path in ("/api/models", "/api/images", "/openapi.json", "/docs", "/"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert "token" in response.json()["detail"]
        assert client.get("/api/models", headers={
            "Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/models", headers={
            "Authorization": "Bearer s3cret-t0ken"}).status_code == 200
        assert client.get("/static/app.js").status_code == 200  # the page's code is public
        # The printed link sets the token cookie and drops the token from the address bar.
        opened = client.get("/?token=s3cret-t0ken", follow_redirects=False)
        assert opened.status_code == 303
        assert opened.headers["location"] == "/"
        assert "HttpOnly" in opened.headers["set-cookie"]
        assert client.get("/").status_code == 200
        assert client.get("/api/models").status_code == 200
        assert client.get("/?token=nope", follow_redirects=False).status_code in (200, 303)
    with make_client(app, "http://box.lan") as stranger:
        assert stranger.get("/?token=nope").status_code == 401


def test_upload_cache_is_bounded_in_bytes(tiny_loaded):
    """Uploads count their decoded bytes (3 per pixel), not just their number."""
    from convscope.server import create_app

    budget = 3 * (100 * 100) * 2 + 10  # two 100x100 images fit, three do not
    app = create_app(Settings(models={"tiny": tiny_loaded}, upload_bytes=budget, max_uploads=32))
    state = app.state.convscope
    ids = []
    with make_client(app) as client:
        for shade in range(4):
            response = client.post("/api/images", content=png_bytes((100, 100), (shade, 0, 0)),
                                   headers={"Content-Type": "image/png"})
            ids.append(response.json()["id"])
        status = client.get("/api/status").json()
        uploads = status["caches"]["uploads"]
        assert uploads["entries"] == 2
        assert uploads["bytes"] == 2 * 100 * 100 * 3
        assert uploads["max_bytes"] == budget
        listed = {row["id"] for row in client.get("/api/images").json()}
        assert ids[:2] == [i for i in ids if i not in listed]  # the oldest went first
        assert client.get("/api/input.png", params={"image": ids[0]}).status_code == 404
        assert client.get("/api/input.png", params={"image": ids[3]}).status_code == 200
        for name in ("uploads", "forwards", "cams"):
            cache = status["caches"][name]
            assert cache["max_bytes"] > 0
            assert 0 <= cache["bytes"] <= cache["max_bytes"]
        assert status["jobs"]["max_jobs"] == state.settings.max_jobs


def test_forward_cache_is_bounded_in_bytes(tiny_loaded):
    from convscope.server import create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, cache_entries=50,
                              cache_bytes=160_000))
    state = app.state.convscope
    with make_client(app) as client:
        for image in ("sample:chelsea", "sample:coffee", "sample:rocket", "sample:astronaut"):
            assert client.get("/api/grid.png", params={"image": image, "layer": "features.0"}
                              ).status_code == 200
            assert client.get("/api/grid.png", params={"image": image, "layer": "features.2"}
                              ).status_code == 200
        sizes = [r.nbytes for r in state.forwards.values()]
        # One image with all layers captured is 73,764 bytes at 32x32: two fit.
        assert sizes == [73_764, 73_764]
        assert state.forwards.nbytes() == sum(sizes) <= 160_000
        assert client.get("/api/status").json()["caches"]["forwards"]["bytes"] == sum(sizes)


# ------------------------------------------------------------------ a live server (raw HTTP)

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live(tiny_app):
    """The app under uvicorn on a loopback port, with every raw request path recorded."""
    import uvicorn

    seen: list[bytes] = []

    async def recorder(scope, receive, send):
        if scope["type"] == "http":
            seen.append(scope.get("raw_path") or scope["path"].encode())
        await tiny_app(scope, receive, send)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(recorder, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield port, seen
    server.should_exit = True
    thread.join(timeout=10)


def raw_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET with the path sent exactly as given (http.client does not normalise ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/static/../state.py", "/static/../../server/state.py", "/static/%2e%2e/state.py",
    "/static/..%2fstate.py", "/static/./../app.py", "/static//../settings.py",
])
def test_static_path_traversal_raw(live, path):
    """The path reaches the server with its ``..`` (recorded), and no source is served."""
    port, seen = live
    before = len(seen)
    status, body = raw_get(port, path)
    assert seen[before:] == [path.encode()]  # the server saw the raw path
    assert status == 404
    assert b"import" not in body


def test_live_server_refuses_rebinding(live):
    port, _ = live
    assert raw_get(port, "/api/models", host="attacker.example")[0] == 421
    assert raw_get(port, "/api/models", host=f"127.0.0.1:{port}")[0] == 200
    assert raw_get(port, "/static/app.js")[0] == 200


def test_serve_cli_token_and_hosts(monkeypatch, capsys):
    """A non-loopback bind gets a token (made up and printed, or from --token or
    $CONVSCOPE_TOKEN); a loopback bind needs none; --allow-host sets the allow-list."""
    import uvicorn

    from convscope.cli.main import main

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app))
    monkeypatch.delenv("CONVSCOPE_TOKEN", raising=False)
    assert main(["serve", "--model", "resnet18", "--host", "0.0.0.0"]) == 0
    settings = seen["app"].state.convscope.settings
    err = capsys.readouterr().err
    assert settings.token and len(settings.token) >= 20
    assert f"?token={settings.token}" in err
    assert "warning" in err
    assert settings.hosts() is None
    assert main(["serve", "--model", "resnet18", "--host", "0.0.0.0", "--token", "abc",
                 "--allow-host", "box.lan", "--cache-mb", "64", "--upload-cache-mb", "32",
                 "--max-jobs", "2"]) == 0
    settings = seen["app"].state.convscope.settings
    assert settings.token == "abc"
    assert settings.hosts() == {"box.lan"}
    assert (settings.cache_bytes, settings.upload_bytes, settings.max_jobs) == (
        64 * 2**20, 32 * 2**20, 2)
    monkeypatch.setenv("CONVSCOPE_TOKEN", "from-env")
    assert main(["serve", "--model", "resnet18"]) == 0
    settings = seen["app"].state.convscope.settings
    assert settings.token == "from-env"
    assert settings.hosts() == {"localhost", "127.0.0.1", "::1"}
    monkeypatch.delenv("CONVSCOPE_TOKEN")
    assert main(["serve", "--model", "resnet18"]) == 0
    assert seen["app"].state.convscope.settings.token is None
    assert "?token=" not in capsys.readouterr().err.splitlines()[-1]
