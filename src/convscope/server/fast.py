"""A lean path for the explorer's hot GET routes, between the guard and FastAPI.

A layer or channel switch is two or three small requests whose own work is a few
milliseconds of drawing, much of it in numpy and zlib outside the GIL. The work around it
holds the GIL: FastAPI's routing, dependency solving and validation on the event loop's
thread, and AnyIO's hand-off to a worker thread and back. Under many clients that work,
and the threads queueing for the GIL, is what kept the drawing from using the second
core. This ASGI app answers those routes itself: it parses the query string, converts each value as the route
declares it, and calls the **route's own function** (the one FastAPI calls, so the same
views and the same ``Response``: same status, headers and body).

Everything is read from the routes' declarations (names, defaults, types, ``Query``
bounds), so the two paths cannot drift apart. A request is handed untouched to FastAPI
when this path does not fully understand it: another method (HEAD included), a parameter
that is unknown, repeated, missing or not in its plain canonical form (``count=5``, not
``count=05``), a value out of its bounds, or any exception from the route function (so
errors and their JSON always come from FastAPI's handlers). A route whose declaration uses
anything else (a ``Request``, a pattern, an alias) is not taken at all.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import threading
import types
import typing
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

log = logging.getLogger(__name__)

#: The routes a layer or channel switch requests (``benchmarks/bench_server.py``).
HOT_PATHS = ("/api/grid", "/api/grid.png", "/api/channel", "/api/channel.png",
             "/api/filters.png")

#: Canonical spellings this path converts itself; anything else goes to FastAPI.
_INT = re.compile(r"0|[1-9][0-9]{0,17}")
_FLOAT = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,17})?")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


class NotUnderstood(ValueError):
    """A query value this path leaves to FastAPI (which answers or refuses it)."""


@dataclass(frozen=True)
class Param:
    """One query parameter of a route: how to convert its text, and its default."""

    name: str
    convert: Callable[[str], Any]
    required: bool
    default: Any = None


@dataclass(frozen=True)
class Route:
    """A route this path answers: the route's function and its query parameters."""

    endpoint: Callable[..., Any]
    params: dict[str, Param]

    def arguments(self, query_string: bytes) -> dict[str, Any]:
        """The keyword arguments FastAPI would pass for ``query_string`` (its parsing:
        ``parse_qsl`` of the latin-1 text, blank values kept); :class:`NotUnderstood`
        when this path leaves the request to FastAPI."""
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        given: dict[str, Any] = {}
        for name, text in pairs:
            param = self.params.get(name)
            if param is None or name in given:
                raise NotUnderstood(f"unknown or repeated parameter {name!r}")
            given[name] = param.convert(text)
        for name, param in self.params.items():
            if name not in given:
                if param.required:
                    raise NotUnderstood(f"missing parameter {name!r}")
                given[name] = param.default
        return given


class RequestPool:
    """The fast path's threads: a ``ThreadPoolExecutor`` started on first use, stopped by
    :meth:`close` (the app's shutdown) and started again if the app serves again."""

    def __init__(self, threads: int):
        if int(threads) < 1:  # refused when the app is made, not at its first request
            raise ValueError(f"fast_threads must be at least 1, got {threads}")
        self.threads = int(threads)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        """The running executor (created if needed)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.threads,
                                                    thread_name_prefix="convscope-request")
            return self._executor

    def close(self) -> None:
        """Stop the threads (waits for running calls)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


class FastPath:
    """ASGI middleware: answers :data:`HOT_PATHS` GETs through the route functions, hands
    everything else to ``app`` (FastAPI) untouched (see the module doc).

    The route functions run in ``pool``, threads the app owns (``Settings.fast_threads``),
    reached with ``loop.run_in_executor``: one future and
    one wake-up of the loop per request. AnyIO's worker hand-off (FastAPI's) does more
    Python work under the GIL on both threads (limiter, queue, condition variables): in
    ``benchmarks/bench_server.py`` with 16 clients on 2 cores, 343 switches/s through it
    against 405 through the executor (median of 4 interleaved runs each).
    """

    def __init__(self, app: Any, routes: dict[str, Route], pool: RequestPool):
        self.app = app
        self.routes = routes
        self.pool = pool

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = (self.routes.get(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "GET"
                 and not scope.get("root_path") else None)
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            arguments = route.arguments(scope.get("query_string", b""))
        except NotUnderstood:
            await self.app(scope, receive, send)
            return
        # In the pool, in a copy of this context (as FastAPI runs a plain ``def`` route).
        call = partial(contextvars.copy_context().run, route.endpoint, **arguments)
        try:
            response = await asyncio.get_running_loop().run_in_executor(
                self.pool.executor(), call)
        except Exception as error:  # FastAPI runs it again and answers with its handlers
            log.debug("fast path: %s %s handed to FastAPI after %r", scope["method"],
                      scope["path"], error)
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def hot_routes(routes: Iterable[Any], paths: Iterable[str] = HOT_PATHS) -> dict[str, Route]:
    """:class:`Route` of each GET route of ``routes`` (FastAPI's ``app.routes``) at one of
    ``paths`` whose declaration this path fully understands; others are left out."""
    wanted = set(paths)
    found: dict[str, Route] = {}
    for route in routes:
        path = getattr(route, "path", None)
        if path not in wanted or path in found or getattr(route, "methods", None) != {"GET"}:
            continue
        params = _query_params(route.endpoint)
        if params is None:
            log.debug("fast path: %s left to FastAPI (declaration not understood)", path)
            continue
        found[path] = Route(route.endpoint, params)
    return found


def _query_params(endpoint: Callable[..., Any]) -> dict[str, Param] | None:
    """The query parameters of a route function, or None if any is more than a plain
    ``str``, ``int``, ``float``, ``bool`` or string ``Literal`` (optionally ``| None``)
    with ``Query`` length and range bounds."""
    from fastapi import params as fastapi_params
    from pydantic.fields import FieldInfo

    try:  # string annotations (``from __future__ import annotations``) as FastAPI reads them
        signature = inspect.signature(endpoint, eval_str=True)
    except Exception:  # a name the function's module cannot resolve
        return None
    out: dict[str, Param] = {}
    for name, parameter in signature.parameters.items():
        annotation, field = parameter.annotation, None
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *extras = typing.get_args(annotation)
            infos = [extra for extra in extras if isinstance(extra, FieldInfo)]
            if len(infos) != len(extras) or len(infos) > 1:
                return None
            field = infos[0] if infos else None
        if isinstance(parameter.default, FieldInfo) or (field is not None and (
            type(field) is not fastapi_params.Query or field.alias is not None
            or field.validation_alias is not None
        )):  # ``= Query(...)`` defaults, path/header/cookie parameters, aliases
            return None
        convert = _converter(annotation, field.metadata if field is not None else [])
        if convert is None:
            return None
        required = parameter.default is inspect.Parameter.empty
        out[name] = Param(name, convert, required, None if required else parameter.default)
    return out


def _converter(annotation: Any, metadata: list[Any]) -> Callable[[str], Any] | None:
    """A function from query text to the value the route receives, checking ``metadata``
    bounds (annotated_types ``MinLen``/``MaxLen``/``Ge``/``Le``/``Gt``/``Lt``); None for
    an annotation or bound it does not know."""
    import annotated_types as at

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(annotation)) != 2:
            return None
        annotation = members[0]  # a value given is converted as the non-None type
    checks: list[Callable[[Any], bool]] = []
    for bound in metadata:
        if isinstance(bound, at.MaxLen):
            checks.append(partial(lambda limit, v: len(v) <= limit, bound.max_length))
        elif isinstance(bound, at.MinLen):
            checks.append(partial(lambda limit, v: len(v) >= limit, bound.min_length))
        elif isinstance(bound, at.Ge):
            checks.append(partial(lambda limit, v: v >= limit, bound.ge))
        elif isinstance(bound, at.Le):
            checks.append(partial(lambda limit, v: v <= limit, bound.le))
        elif isinstance(bound, at.Gt):
            checks.append(partial(lambda limit, v: v > limit, bound.gt))
        elif isinstance(bound, at.Lt):
            checks.append(partial(lambda limit, v: v < limit, bound.lt))
        else:
            return None
    if annotation is str:
        parse: Callable[[str], Any] = str
    elif annotation is int:
        parse = partial(_match, _INT, int)
    elif annotation is float:
        parse = partial(_match, _FLOAT, float)
    elif annotation is bool:
        parse = _bool
    elif typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if not all(type(choice) is str for choice in choices) or checks:
            return None
        parse = partial(_choice, frozenset(choices))
    else:
        return None
    return partial(_checked, parse, tuple(checks))


def _match(pattern: re.Pattern[str], cast: Callable[[str], Any], text: str) -> Any:
    if pattern.fullmatch(text) is None:
        raise NotUnderstood(text)
    return cast(text)


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text]
    except KeyError:
        raise NotUnderstood(text) from None


def _choice(choices: frozenset[str], text: str) -> str:
    if text not in choices:
        raise NotUnderstood(text)
    return text


def _checked(parse: Callable[[str], Any], checks: tuple[Callable[[Any], bool], ...],
             text: str) -> Any:
    value = parse(text)
    for check in checks:
        if not check(value):
            raise NotUnderstood(text)
    return value
