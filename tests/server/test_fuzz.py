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


@pytest.mark.slow
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
    # Whatever was thrown at it, every cache stayed within its byte bound.
    status = fuzz_app.state.convscope.status()
    for name, cache in status["caches"].items():
        assert cache["bytes"] <= cache["max_bytes"], (name, cache)


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


# ------------------------------------------------------------------ image bytes

#: (mode, formats that can hold it) for every Pillow mode an upload may arrive in.
MODES = [
    ("1", ["PNG", "BMP", "TIFF", "GIF"]), ("L", ["PNG", "JPEG", "WEBP", "TIFF"]),
    ("LA", ["PNG", "TIFF"]), ("P", ["PNG", "GIF", "BMP"]),
    ("RGB", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]), ("RGBA", ["PNG", "WEBP", "TIFF"]),
    ("CMYK", ["JPEG", "TIFF"]), ("I;16", ["PNG", "TIFF"]), ("I", ["PNG", "TIFF"]),
    ("F", ["TIFF"]), ("YCbCr", ["JPEG"]),
]


def _encode(mode: str, fmt: str, size: tuple[int, int], seed: int, frames: int,
            transparent: bool) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size

    def frame(i: int) -> Image.Image:
        rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        if mode == "F":
            return Image.fromarray(rng.normal(size=(height, width)).astype(np.float32), "F")
        if mode == "I;16":
            return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16),
                                   "I;16")
        if mode == "I":
            return Image.fromarray(rng.integers(-5000, 70000, (height, width),
                                                dtype=np.int32), "I")
        if mode in ("P", "PA"):
            image = rgb.quantize(8)
            return image.convert("PA") if mode == "PA" else image
        return rgb.convert(mode)

    images = [frame(i) for i in range(frames)]
    options: dict = {}
    if transparent and images[0].mode == "P":
        options["transparency"] = 0
    if frames > 1 and fmt in ("GIF", "WEBP", "TIFF", "PNG"):
        options.update(save_all=True, append_images=images[1:])
    # Some combinations cannot be written (Pillow refuses, e.g., transparency in an
    # animated PNG of that mode): drop options until the file can be made.
    for drop in ((), ("transparency",), ("transparency", "save_all", "append_images")):
        buffer = io.BytesIO()
        try:
            images[0].save(buffer, format=fmt,
                           **{k: v for k, v in options.items() if k not in drop})
        except (OSError, ValueError, TypeError):
            continue
        return buffer.getvalue()
    raise AssertionError(f"cannot write {mode} as {fmt}")


def _huge_png(width: int, height: int) -> bytes:
    """A PNG header that claims ``width`` x ``height`` (with valid CRCs) and no real data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def upload_app(tiny_loaded):
    from convscope.server import Settings, create_app

    return create_app(Settings(models={"tiny": tiny_loaded}, max_upload_bytes=256 * 1024,
                               max_pixels=300_000, upload_bytes=2 * 1024 * 1024,
                               cache_bytes=4 * 1024 * 1024))


@pytest.mark.slow
def test_fuzz_image_bytes_never_500(upload_app):
    """Every Pillow mode and container (animated GIF/WebP/PNG, multi-page TIFF), cut short,
    corrupted or claiming huge sizes: each upload is 200 or a clear 4xx, an accepted one
    is served, and the caches stay within their byte bounds."""
    from fastapi.testclient import TestClient
    from hypothesis import strategies as st

    state = upload_app.state.convscope
    outcomes: dict[int, int] = {}

    with TestClient(upload_app, base_url=LOCAL) as client:

        def post(data: bytes) -> int:
            response = client.post("/api/images", content=data,
                                   headers={"Content-Type": "image/x-anything"})
            body = response.json()
            assert response.status_code in (200, 400, 413, 415), (response.status_code, body)
            if response.status_code != 200:
                assert isinstance(body["detail"], str) and len(body["detail"]) > 10
                return response.status_code
            shown = client.get("/api/grid.png", params={"image": body["id"],
                                                        "layer": "features.0"})
            assert shown.status_code == 200, shown.text
            assert client.get("/api/predict", params={"image": body["id"]}).status_code == 200
            return 200

        @given(
            mode_formats=st.sampled_from(MODES), data=st.data(),
            size=st.tuples(st.integers(1, 70), st.integers(1, 70)),
            seed=st.integers(0, 2**16), frames=st.integers(1, 3), transparent=st.booleans(),
            damage=st.sampled_from(["none", "none", "truncate", "flip", "prefix"]),
        )
        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(mode_formats, data, size, seed, frames, transparent, damage):
            mode, formats = mode_formats
            fmt = data.draw(st.sampled_from(formats))
            raw = _encode(mode, fmt, size, seed, frames, transparent)
            if damage == "truncate":
                raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
            elif damage == "flip":
                at = data.draw(st.integers(0, len(raw) - 1))
                raw = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]
            elif damage == "prefix":
                raw = raw[:16]
            status = post(raw) if raw else 400
            outcomes[status] = outcomes.get(status, 0) + 1
            if damage == "none":
                assert status == 200, (mode, fmt, size, frames)

        check()
        for width, height in ((100_000, 100_000), (2**31 - 1, 1), (600, 600), (0, 10)):
            assert post(_huge_png(width, height)) in (413, 415, 400)
        status = client.get("/api/status").json()["caches"]
    assert outcomes.get(200, 0) >= 20 and sum(outcomes.values()) == 60
    for name in ("uploads", "forwards"):
        assert status[name]["bytes"] <= status[name]["max_bytes"], status
    assert state.images.uploads.nbytes() <= 2 * 1024 * 1024
