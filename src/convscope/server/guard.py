"""The explorer's front door: Host allow-list, token, client id and security headers.

A plain ASGI middleware (no request body buffering, so uploads still stream):

* **Host allow-list.** A page on another site can make a browser send requests to
  127.0.0.1 under its own host name (DNS rebinding); answering only the names this
  server is known by (the loopback names when bound to loopback) stops that.
* **Origin check.** State-changing requests (POST, DELETE) carrying an ``Origin`` of
  another host are refused, so another site cannot upload or start jobs through a
  visitor's browser, even with a form post (``multipart/form-data`` needs no preflight).
* **Token.** With a token set (needed when the server is reachable from other machines)
  every API call must carry it: ``Authorization: Bearer TOKEN`` or the cookie that
  opening ``/?token=TOKEN`` sets (images in ``<img>`` tags cannot send headers).
* **Client id.** A random cookie names each browser, so uploads and jobs are per client.
* **Security headers** on every answer: no sniffing, no framing, no referrer (tokens
  and capability links stay out of other sites' logs), a strict CSP for the page.
"""

from __future__ import annotations

import hmac
import json
import secrets
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: Cookie names: the client id (per browser) and the token.
CLIENT_COOKIE = "convscope_client"
TOKEN_COOKIE = "convscope_token"
#: Key of the client id in the ASGI scope (read by the routes).
CLIENT_KEY = "convscope.client"

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: The page and the API: only this origin's scripts, styles and images.
CSP = (b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
       b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       b"frame-ancestors 'none'; form-action 'self'")
#: Swagger UI at /docs loads its script and styles from a CDN.
CSP_DOCS = (b"default-src 'self'; img-src 'self' data: https:; style-src 'self' "
            b"'unsafe-inline' https://cdn.jsdelivr.net; script-src 'self' 'unsafe-inline' "
            b"https://cdn.jsdelivr.net; frame-ancestors 'none'")
#: Paths open without the token: the static front end, which holds no data.
PUBLIC_PREFIXES = ("/static/", "/favicon.ico")


def host_name(value: str) -> str:
    """The host of a ``Host`` header or URL netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.split(":", 1)[0]


class Guard:
    """ASGI middleware: allow-list, token, client id and headers (see the module doc)."""

    def __init__(self, app: Any, hosts: set[str] | None, token: str | None):
        self.app = app
        self.hosts = hosts
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            await _refuse(send, 421, f"host {host!r} is not served here; open the explorer "
                                     "at the address convscope serve printed (or start it "
                                     "with --allow-host)")
            return
        origin = headers.get("origin")
        cross_site = origin is not None and (
            origin == "null" or host_name(urlsplit(origin).netloc) != host)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and cross_site:
            await _refuse(send, 403, "cross-site request refused")
            return
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header counts as no cookies
            cookies = SimpleCookie()
        path = scope["path"]
        set_cookies: list[bytes] = []
        if self.token is not None and not path.startswith(PUBLIC_PREFIXES):
            given = _bearer(headers.get("authorization", ""))
            if given is None and TOKEN_COOKIE in cookies:
                given = cookies[TOKEN_COOKIE].value
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if given is None and path == "/" and "token" in query:
                given = query["token"][0]
                if hmac.compare_digest(given.encode(), self.token.encode()):
                    # Keep the token in a cookie and drop it from the address bar.
                    await _redirect(send, "/", _cookie(TOKEN_COOKIE, given))
                    return
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _refuse(send, 401, "this explorer needs its token: open the link "
                                         "convscope serve printed, or send "
                                         "'Authorization: Bearer TOKEN'")
                return
        client = cookies[CLIENT_COOKIE].value if CLIENT_COOKIE in cookies else ""
        if not (16 <= len(client) <= 64 and client.replace("-", "").replace("_", "").isalnum()):
            client = secrets.token_urlsafe(24)
            set_cookies.append(_cookie(CLIENT_COOKIE, client))
        scope[CLIENT_KEY] = client
        csp = CSP_DOCS if path.startswith(("/docs", "/redoc")) else CSP

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [*SECURITY_HEADERS, (b"content-security-policy", csp)]
                extra += [(b"set-cookie", cookie) for cookie in set_cookies]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _bearer(value: str) -> str | None:
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials else None


def _cookie(name: str, value: str) -> bytes:
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS, (b"content-security-policy", CSP)]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Any, location: str, cookie: bytes) -> None:
    await send({"type": "http.response.start", "status": 303, "headers": [
        (b"location", location.encode()), (b"set-cookie", cookie),
        (b"content-length", b"0"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b""})
