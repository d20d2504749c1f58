"""The explorer's FastAPI app: JSON + PNG routes over :mod:`convscope.server.views`.

Routes are plain ``def`` functions: FastAPI runs them in its thread pool, and torch,
numpy and zlib release the GIL in their kernels, so concurrent requests render in
parallel instead of queueing behind one lock. Only the upload route is ``async``, to stop
reading a body as soon as it exceeds the limit.
"""

# No ``from __future__ import annotations``: FastAPI reads the route annotations, and the
# Annotated aliases are local to create_app (they depend on the settings).

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

from .settings import Settings
from .state import ServerState
from .views import (
    CamUnavailableError,
    GridParams,
    NoSpatialMapError,
    atlas_crops_path,
    cam_image,
    cam_methods,
    channel_image,
    channel_view,
    filter_image,
    grid_image,
    grid_view,
    input_image,
    layers_view,
    models_view,
    png_bytes,
    predictions_view,
)

log = logging.getLogger(__name__)

#: Responses depend only on their URL (image ids are content hashes): let browsers cache.
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


def create_app(settings: Settings | None = None) -> Any:
    """Build the explorer app; its :class:`ServerState` is ``app.state.convscope``."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    from ..errors import (
        ConvscopeError,
        ImageError,
        ImageTooLargeError,
        NotAConvLayerError,
        TargetError,
        UnknownNameError,
    )

    settings = settings or Settings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        if settings.worker_threads:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = \
                settings.worker_threads
        try:
            yield
        finally:
            state.models.close()

    app = FastAPI(
        lifespan=lifespan,
        title="convscope explorer",
        description="Activations, filters and class activation maps of a CNN, as JSON and "
                    "PNG. Every view is computed by the convscope library.",
        version=_version(),
    )
    app.state.convscope = state
    static = resources.files("convscope.server") / "static"

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"detail": message, **extra}, status_code=status)

    @app.exception_handler(ConvscopeError)
    def _convscope_error(_request: Request, exc: ConvscopeError) -> JSONResponse:
        if isinstance(exc, UnknownNameError):
            return error(404, str(exc), suggestions=exc.suggestions)
        if isinstance(exc, ImageTooLargeError):
            return error(413, str(exc))
        if isinstance(exc, ImageError):
            return error(415, str(exc))
        if isinstance(exc, (NotAConvLayerError, NoSpatialMapError, TargetError)):
            return error(422, str(exc))
        if isinstance(exc, CamUnavailableError):
            return error(501, str(exc))
        return error(400, str(exc))

    @app.exception_handler(FileNotFoundError)
    def _missing(_request: Request, exc: FileNotFoundError) -> JSONResponse:
        return error(404, str(exc))

    def png(image: Any) -> Response:
        return Response(png_bytes(image), media_type="image/png", headers=CACHE_HEADERS)

    Model = Annotated[str | None, Query(description="served model name (default: the first)",
                                        max_length=200)]
    Image = Annotated[str, Query(description="image id from /api/images", max_length=200)]
    Layer = Annotated[str, Query(description="dotted layer name from /api/layers",
                                 max_length=300)]
    Channel = Annotated[int, Query(ge=0, le=1_000_000, description="channel index")]
    Cmap = Annotated[str, Query(max_length=40, description="matplotlib colour map")]
    Count = Annotated[int, Query(ge=1, le=settings.max_channels,
                                 description="channels drawn")]
    Tile = Annotated[int | None, Query(ge=4, le=settings.max_tile,
                                       description="tile size in pixels (default: auto)")]

    def model_name(model: str | None) -> str:
        return model or state.models.default

    def grid_params(normalize: str, cmap: str, sort: str | None, count: int,
                    tile: int | None) -> GridParams:
        return GridParams(normalize=normalize, cmap=cmap, sort=sort or None, count=count,
                          tile=tile)

    @app.get("/", include_in_schema=False)
    def index() -> Any:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api", include_in_schema=False)
    def api_index() -> Any:
        """The API reference as plain HTML from the OpenAPI schema (works offline, unlike
        the Swagger UI at /docs, which loads its scripts from a CDN)."""
        return HTMLResponse(api_reference_html(app.openapi()))

    @app.get("/api/models", summary="Served models")
    def api_models() -> list[dict[str, Any]]:
        return models_view(state)

    @app.get("/api/images", summary="Offered images (samples, files, uploads)")
    def api_images() -> list[dict[str, str]]:
        return state.images.listing()

    @app.post(
        "/api/images", summary="Upload an image (raw bytes as the request body)",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }}},
        responses={413: {"description": "too many bytes or pixels"},
                   415: {"description": "not a readable image"}},
    )
    async def api_upload(request: Request) -> Any:
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return error(400, f"invalid Content-Length {declared!r}")
            if size > limit:
                return error(413, f"upload of {size:,} bytes is over the limit of {limit:,}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                return error(413, f"upload is over the limit of {limit:,} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            return error(400, "empty upload: send the image file's bytes as the body")
        image_id, image = await run_in_threadpool(state.images.add_upload, data)
        return {"id": image_id, "width": image.width, "height": image.height}

    @app.get("/api/input.png", summary="The input as the model sees it",
             response_class=Response)
    def api_input(image: Image, model: Model = None) -> Response:
        return png(input_image(state, model_name(model), image))

    @app.get("/api/predict", summary="Top-k predictions")
    def api_predict(image: Image, model: Model = None,
                    k: Annotated[int, Query(ge=1, le=10)] = 5) -> list[dict[str, Any]]:
        return predictions_view(state, model_name(model), image, k)

    @app.get("/api/layers", summary="Layer table with output shapes and receptive fields")
    def api_layers(model: Model = None) -> list[dict[str, Any]]:
        return layers_view(state, model_name(model))

    @app.get("/api/grid", summary="Feature-grid layout (channel order) and layer statistics")
    def api_grid(
        image: Image, layer: Layer, model: Model = None,
        normalize: Literal["channel", "layer", "none"] = "channel", cmap: Cmap = "viridis",
        sort: Literal["", "mean", "max"] = "", count: Count = 64, tile: Tile = None,
    ) -> dict[str, Any]:
        return grid_view(state, model_name(model), image, layer,
                         grid_params(normalize, cmap, sort, count, tile))

    @app.get("/api/grid.png", summary="Feature grid of a layer", response_class=Response)
    def api_grid_png(
        image: Image, layer: Layer, model: Model = None,
        normalize: Literal["channel", "layer", "none"] = "channel", cmap: Cmap = "viridis",
        sort: Literal["", "mean", "max"] = "", count: Count = 64, tile: Tile = None,
    ) -> Response:
        return png(grid_image(state, model_name(model), image, layer,
                              grid_params(normalize, cmap, sort, count, tile)))

    @app.get("/api/channel", summary="Statistics of one channel")
    def api_channel(image: Image, layer: Layer, channel: Channel,
                    model: Model = None) -> dict[str, Any]:
        return channel_view(state, model_name(model), image, layer, channel)

    @app.get("/api/channel.png", summary="One channel drawn large", response_class=Response)
    def api_channel_png(
        image: Image, layer: Layer, channel: Channel, model: Model = None,
        cmap: Cmap = "viridis",
        size: Annotated[int, Query(ge=16, le=1024)] = 320,
    ) -> Response:
        return png(channel_image(state, model_name(model), image, layer, channel, cmap, size))

    @app.get("/api/filters.png", summary="Filters of a conv layer (or of one channel)",
             response_class=Response)
    def api_filters_png(
        layer: Layer, model: Model = None,
        channel: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
        count: Count = 64,
        tile: Annotated[int, Query(ge=4, le=128)] = 24,
    ) -> Response:
        return png(filter_image(state, model_name(model), layer, channel, count, tile))

    @app.get("/api/cam/methods", summary="CAM methods available")
    def api_cam_methods() -> list[str]:
        return cam_methods()

    @app.get("/api/cam.png", summary="CAM overlay for one class", response_class=Response)
    def api_cam_png(
        image: Image, model: Model = None,
        method: Annotated[str, Query(max_length=40)] = "gradcam",
        target: Annotated[int | None, Query(ge=0, le=1_000_000,
                                            description="class index (default top-1)")] = None,
        layer: Annotated[str, Query(max_length=300, description="default: last spatial")] = "",
        alpha: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
        cmap: Cmap = "jet",
    ) -> Response:
        return png(cam_image(state, model_name(model), image, method, target, layer or None,
                             alpha, cmap))

    @app.get("/api/atlas/crops.jpg", summary="Top-k dataset crops of a channel (atlas)",
             response_class=Response)
    def api_atlas_crops(layer: Layer, channel: Channel) -> Response:
        path = atlas_crops_path(state, layer, channel)
        if path is None:
            return error(404, f"no atlas crops for {layer!r} channel {channel}"
                              + ("" if state.atlas else " (start with --atlas DIR)"))
        return Response(path.read_bytes(), media_type="image/jpeg", headers=CACHE_HEADERS)

    @app.get("/api/status", summary="Cache and model status")
    def api_status() -> dict[str, Any]:
        return {
            "models_loaded": [n for n, e in state.models.entries.items() if e.loaded],
            "forward_passes": state.forward_count,
            "cache": {"entries": len(state.forwards), "bytes": state.forwards.nbytes(),
                      "hits": state.forwards.hits, "misses": state.forwards.misses},
            "atlas": state.atlas is not None,
        }

    return app


def api_reference_html(schema: dict[str, Any]) -> str:
    """One HTML table per route: method, path, summary and query parameters."""
    from html import escape

    parts = [f"<!doctype html><meta charset='utf-8'><title>{escape(schema['info']['title'])} API"
             "</title><style>body{font:14px system-ui;margin:2rem;max-width:960px}"
             "td,th{padding:2px 8px;text-align:left}code{background:#eef}</style>",
             f"<h1>{escape(schema['info']['title'])} API</h1>",
             f"<p>{escape(schema['info'].get('description', ''))} Machine-readable: "
             "<a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {escape(path)}</code></h2>"
                         f"<p>{escape(op.get('summary', ''))}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<table><tr><th>parameter</th><th>type</th><th>default</th>"
                             "<th>description</th></tr>")
                for param in params:
                    kind = param.get("schema", {})
                    types = kind.get("type") or "/".join(
                        str(k.get("type", k.get("enum", ""))) for k in kind.get("anyOf", []))
                    if "enum" in kind:
                        types = " | ".join(map(str, kind["enum"]))
                    required = " (required)" if param.get("required") else ""
                    parts.append(
                        f"<tr><td><code>{escape(param['name'])}</code>{required}</td>"
                        f"<td>{escape(str(types))}</td>"
                        f"<td>{escape(str(kind.get('default', '')))}</td>"
                        f"<td>{escape(param.get('description', ''))}</td></tr>")
                parts.append("</table>")
            if "requestBody" in op:
                parts.append("<p>Body: the raw bytes of an image file.</p>")
    return "\n".join(parts)


def _version() -> str:
    from .. import __version__

    return __version__
