"""The explorer's FastAPI app: JSON + PNG routes over :mod:`convscope.server.views`.

Routes are plain ``def`` functions: FastAPI runs them in its thread pool, and torch,
numpy and zlib release the GIL in their kernels, so concurrent requests render in
parallel instead of queueing behind one lock. Only the upload route is ``async``, to stop
reading a body as soon as it exceeds the limit. Expensive work runs as jobs
(:mod:`convscope.server.jobs`); :mod:`convscope.server.guard` checks every request, and
:mod:`convscope.server.fast` answers the GETs of a layer or channel switch through the same
route functions without FastAPI's per-request work.
"""

# No ``from __future__ import annotations``: FastAPI reads the route annotations, and the
# Annotated aliases are local to create_app (they depend on the settings).

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

from .fast import FastPath, RequestPool, hot_routes
from .guard import CLIENT_KEY, Guard
from .jobs import QueueFullError
from .settings import Settings
from .state import ServerState, run_apart
from .views import (
    CamUnavailableError,
    GridParams,
    JobRequiredError,
    NoSpatialMapError,
    atlas_crops_path,
    cam_heatmap,
    cam_methods,
    channel_image,
    channel_view,
    filter_image,
    grid_image,
    grid_view,
    input_image,
    is_expensive,
    layers_view,
    models_view,
    png_bytes,
    predictions_view,
    sanity_view,
    visualization_png,
)

log = logging.getLogger(__name__)

#: Responses depend only on their URL (an image id always names the same pixels): let
#: browsers cache.
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}
#: Content types an upload may have (others, e.g. a cross-site text/plain post, get 415).
UPLOAD_TYPES = ("image/", "application/octet-stream", "multipart/form-data")
#: Room for the multipart envelope around a file at the byte limit.
MULTIPART_OVERHEAD = 64 * 1024
#: A small favicon (the page's first load asks for one).
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           b'<rect width="16" height="16" rx="3" fill="#234"/>'
           b'<rect x="3" y="3" width="4" height="4" fill="#fd5"/>'
           b'<rect x="9" y="3" width="4" height="4" fill="#5bf"/>'
           b'<rect x="3" y="9" width="4" height="4" fill="#5bf"/>'
           b'<rect x="9" y="9" width="4" height="4" fill="#fd5"/></svg>')


def create_app(settings: Settings | None = None) -> Any:
    """Build the explorer app; its :class:`ServerState` is ``app.state.convscope``."""
    from fastapi import FastAPI, Path, Query, Request
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
    # The fast path's threads (FastAPI's own routes keep AnyIO's pool).
    pool = RequestPool(settings.fast_threads)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        if settings.worker_threads:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = \
                settings.worker_threads
        try:
            yield
        finally:
            pool.close()
            state.jobs.close()
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

    @app.exception_handler(JobRequiredError)
    def _job_required(_request: Request, exc: JobRequiredError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "job": exc.job}, status_code=202,
                            headers={"Location": f"/api/jobs/{exc.job['id']}"})

    @app.exception_handler(QueueFullError)
    def _queue_full(_request: Request, exc: QueueFullError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "retry_after": exc.retry_after},
                            status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(FileNotFoundError)
    def _missing(_request: Request, exc: FileNotFoundError) -> JSONResponse:
        return error(404, str(exc))

    def json_answer(content: Any) -> Response:
        """``content`` as the JSON FastAPI would send for it (pydantic's encoder, NaN and
        infinities as null), without FastAPI validating and encoding the answer again in
        another trip through the thread pool: for the views a page asks on every switch."""
        from pydantic_core import to_json

        return Response(to_json(content, inf_nan_mode="null"), media_type="application/json")

    def png(image: Any, photo: bool = False) -> Response:
        """A PNG answer; ``photo``: the input or an overlay on it (see :mod:`.encode`)."""
        return Response(png_bytes(image, photo), media_type="image/png",
                        headers=CACHE_HEADERS)

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

    def client_of(request: Request) -> str:
        return str(request.scope.get(CLIENT_KEY, ""))

    def grid_params(normalize: str, cmap: str, sort: str | None, count: int,
                    tile: int | None) -> GridParams:
        return GridParams(normalize=normalize, cmap=cmap, sort=sort or None, count=count,
                          tile=tile)

    @app.get("/", include_in_schema=False)
    def index() -> Any:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml", headers=CACHE_HEADERS)

    @app.get("/api", include_in_schema=False)
    def api_index() -> Any:
        """The API reference as plain HTML from the OpenAPI schema (works offline, unlike
        the Swagger UI at /docs, which loads its scripts from a CDN)."""
        return HTMLResponse(api_reference_html(app.openapi()))

    @app.get("/api/models", summary="Served models")
    def api_models() -> list[dict[str, Any]]:
        return models_view(state)

    @app.get("/api/images", summary="Offered images (samples, files, your uploads)")
    def api_images(request: Request) -> list[dict[str, str]]:
        return state.images.listing(client_of(request))

    @app.post(
        "/api/images",
        summary="Upload an image: its bytes as the body (image/* or "
                "application/octet-stream), or a multipart/form-data form with one file",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}}},
        }}},
        responses={413: {"description": "too many bytes or pixels"},
                   415: {"description": "not an image content type, or not readable"}},
    )
    async def api_upload(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not content_type.startswith(UPLOAD_TYPES):
            return error(415, f"uploads need an image content type (image/png, image/jpeg, "
                              f"application/octet-stream) or multipart/form-data; got "
                              f"{content_type or 'none'!r}")
        multipart = content_type == "multipart/form-data"
        limit = settings.max_upload_bytes + (MULTIPART_OVERHEAD if multipart else 0)
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
        name = ""
        if multipart:
            found = await _multipart_file(request, data)
            if isinstance(found, str):
                return error(400, found)
            name, data = found
            if len(data) > settings.max_upload_bytes:
                return error(413, f"upload of {len(data):,} bytes is over the limit of "
                                  f"{settings.max_upload_bytes:,}")
        if not data:
            return error(400, "empty upload: send the image file's bytes as the body")
        image_id, image = await run_in_threadpool(state.images.add_upload, data,
                                                  client_of(request), name)
        return {"id": image_id, "width": image.width, "height": image.height}

    @app.get("/api/input.png", summary="The input as the model sees it",
             response_class=Response)
    def api_input(image: Image, model: Model = None) -> Response:
        return png(input_image(state, model_name(model), image), photo=True)

    @app.get("/api/predict", summary="Top-k predictions")
    def api_predict(image: Image, model: Model = None,
                    k: Annotated[int, Query(ge=1, le=10)] = 5,
                    layer: Annotated[str, Query(
                        max_length=300, description="layer shown next: a new image's forward "
                                                    "pass captures it first")] = "",
                    ) -> list[dict[str, Any]]:
        return predictions_view(state, model_name(model), image, k, layer or None)

    @app.get("/api/layers", summary="Layer table with output shapes and receptive fields")
    def api_layers(model: Model = None) -> list[dict[str, Any]]:
        return layers_view(state, model_name(model))

    @app.get("/api/grid", summary="Feature-grid layout (channel order) and layer statistics",
             response_model=dict[str, Any])
    def api_grid(
        image: Image, layer: Layer, model: Model = None,
        normalize: Literal["channel", "layer", "none"] = "channel", cmap: Cmap = "viridis",
        sort: Literal["", "mean", "max"] = "", count: Count = 64, tile: Tile = None,
    ) -> Response:
        return json_answer(grid_view(state, model_name(model), image, layer,
                                     grid_params(normalize, cmap, sort, count, tile)))

    @app.get("/api/grid.png", summary="Feature grid of a layer", response_class=Response)
    def api_grid_png(
        image: Image, layer: Layer, model: Model = None,
        normalize: Literal["channel", "layer", "none"] = "channel", cmap: Cmap = "viridis",
        sort: Literal["", "mean", "max"] = "", count: Count = 64, tile: Tile = None,
    ) -> Response:
        return png(grid_image(state, model_name(model), image, layer,
                              grid_params(normalize, cmap, sort, count, tile)))

    @app.get("/api/channel", summary="Statistics of one channel",
             response_model=dict[str, Any])
    def api_channel(image: Image, layer: Layer, channel: Channel,
                    model: Model = None) -> Response:
        return json_answer(channel_view(state, model_name(model), image, layer, channel))

    @app.get("/api/channel.png", summary="One channel drawn large", response_class=Response)
    def api_channel_png(
        image: Image, layer: Layer, channel: Channel, model: Model = None,
        cmap: Cmap = "viridis",
        size: Annotated[int, Query(ge=16, le=1024)] = 320,
        over: Annotated[bool, Query(description="upsampled over the input image")] = False,
        alpha: Annotated[float, Query(ge=0.0, le=1.0)] = 0.6,
    ) -> Response:
        return png(channel_image(state, model_name(model), image, layer, channel, cmap, size,
                                 over, alpha), photo=over)

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
        request: Request, image: Image, model: Model = None,
        method: Annotated[str, Query(max_length=40)] = "gradcam",
        target: Annotated[int | None, Query(ge=0, le=1_000_000,
                                            description="class index (default top-1)")] = None,
        layer: Annotated[str, Query(max_length=300, description="default: last spatial")] = "",
        alpha: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
        cmap: Cmap = "jet",
    ) -> Response:
        from ..render.overlay import overlay

        result, heatmap = cam_heatmap(state, model_name(model), image, method, target,
                                      layer or None, client=client_of(request))
        # The bilinear resize is large torch work: in a short-lived thread (state.py's doc).
        return png(run_apart(lambda: overlay(result.display, heatmap, alpha=alpha, cmap=cmap)),
                   photo=True)

    @app.get("/api/visualization.png", response_class=Response,
             summary="Feature visualisation of a channel (a job the first time: 202)")
    def api_visualization_png(
        request: Request, layer: Layer, channel: Channel, model: Model = None,
        start: Annotated[bool, Query(description="false: 204 unless already computed")] = True,
    ) -> Response:
        data = visualization_png(state, model_name(model), layer, channel,
                                 client=client_of(request), start=start)
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="image/png", headers=CACHE_HEADERS)

    @app.post("/api/jobs", summary="Start expensive work (Score-/Ablation-CAM, sanity check)",
              status_code=202, responses={429: {"description": "queue full: Retry-After"}})
    def api_jobs_submit(
        request: Request, image: Image, model: Model = None,
        kind: Literal["cam", "sanity"] = "cam",
        method: Annotated[str, Query(max_length=40)] = "scorecam",
        target: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
        layer: Annotated[str, Query(max_length=300)] = "",
        steps: Annotated[int, Query(ge=1, le=16)] = 4,
    ) -> Any:
        name, client = model_name(model), client_of(request)
        if kind == "cam":
            try:
                cam_heatmap(state, name, image, method, target, layer or None, client=client,
                            job=not is_expensive(method))
            except JobRequiredError as queued:
                return JSONResponse(queued.job, status_code=202)
            return {"id": None, "kind": "cam", "status": "done"}  # cached or cheap: ready
        state.forward(name, image)  # unknown model/image names fail here, not in the job
        params = {"model": name, "image": image, "method": method, "target": target,
                  "steps": steps}
        made: dict[str, Any] = {}
        job = made["job"] = state.jobs.submit(
            client, "sanity", ("sanity", name, image, method, target, steps), params,
            lambda: sanity_view(state, name, image, method, target, steps,
                                cancelled=lambda: made.get("job") is not None
                                and made["job"].cancel_requested,
                                progress=lambda *step: made["job"].report(*step)))
        return JSONResponse(job.as_dict(), status_code=202)

    @app.get("/api/jobs/{job_id}", summary="State of a job (poll until done)")
    def api_job(job_id: Annotated[str, Path(max_length=40)]) -> dict[str, Any]:
        job, position = state.jobs.get(job_id)
        return job.as_dict(position)

    @app.delete("/api/jobs/{job_id}", summary="Cancel a job")
    def api_job_cancel(job_id: Annotated[str, Path(max_length=40)]) -> dict[str, Any]:
        return state.jobs.cancel(job_id).as_dict()

    @app.get("/api/atlas/crops.jpg", summary="Top-k dataset crops of a channel (atlas)",
             response_class=Response)
    def api_atlas_crops(layer: Layer, channel: Channel) -> Response:
        path = atlas_crops_path(state, layer, channel)
        if path is None:
            return error(404, f"no atlas crops for {layer!r} channel {channel}"
                              + ("" if state.atlas else " (start with --atlas DIR)"))
        return Response(path.read_bytes(), media_type="image/jpeg", headers=CACHE_HEADERS)

    @app.get("/api/status", summary="Caches (entries and bytes), jobs and models")
    def api_status() -> dict[str, Any]:
        return state.status()

    # Guard -> fast path -> FastAPI (the last middleware added is the outermost): every
    # request is checked first; the hot GETs skip FastAPI's routing and validation.
    if settings.fast_path:
        app.add_middleware(FastPath, routes=hot_routes(app.routes), pool=pool)
    app.add_middleware(Guard, hosts=settings.hosts(), token=settings.token)
    return app


async def _multipart_file(request: Any, body: bytes) -> tuple[str, bytes] | str:
    """``(file name, bytes)`` of the one file in a multipart body already read (bounded),
    or a message saying what is wrong."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette raises HTTPException/MultiPartException
        return f"malformed multipart/form-data upload: {getattr(exc, 'detail', exc)}"
    try:
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        if not files:
            return "the multipart/form-data upload holds no file (send it as file=@photo.jpg)"
        return files[0].filename or "", await files[0].read()
    finally:
        await form.close()


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
                parts.append("<p>Body: the bytes of an image file (Content-Type image/* or "
                             "application/octet-stream), or a multipart/form-data form with "
                             "one file.</p>")
    return "\n".join(parts)


def _version() -> str:
    from .. import __version__

    return __version__
