"""The gate in front of every route (pure ASGI, so it acts before a request body is read).

- API key: when set, every path but the public ones (health, the page and its files, the API
  description) needs it in ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``, compared in constant
  time (hmac.compare_digest). A refused request is answered before its body is read.
- Upload cap: a declared Content-Length over the cap is refused at once (413, nothing read); a body
  without one (chunked) is counted while it streams and refused as soon as it passes the cap.
- Host check (loopback binds): only Host headers naming this machine are served, so a web page whose
  domain re-resolves to 127.0.0.1 (DNS rebinding) cannot reach the API through the visitor's browser.
- Cross-site writes: a POST/PATCH/DELETE whose Origin is not this server is refused, so another site
  cannot submit forms to the API (CSRF) of a server running without a key. The opaque origin "null"
  (a sandboxed iframe, a data: or file: page, some redirects) is refused too: it is what a hostile page
  can send on purpose, and no page of this server ever sends it. A browser that sends no Origin but
  says ``Sec-Fetch-Site: cross-site`` is refused the same way.
- Security headers on every answer; a Content-Security-Policy on the page; no caching of API answers.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC = ("/", "/favicon.ico", "/api/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class UploadTooLarge(HTTPException):
    """A request body over the upload cap (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload too large: the request body is over the limit of {mb(limit)} (--max-upload-mb)")


def mb(n: int) -> str:
    """Bytes as megabytes for messages."""
    return f"{n / 2**20:g} MB"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def host_name(host: str) -> str:
    """The host part of a Host header (no port; IPv6 without brackets)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_site(scope: Scope, host: str) -> str | None:
    """Why a write request comes from another site's page (None when it does not): an Origin header that
    is not this server, including the opaque origin "null" (sandboxed iframes, data: and file: pages), or,
    without an Origin, a browser's ``Sec-Fetch-Site: cross-site``. Clients that are not browsers (curl,
    scripts) send neither and pass."""
    origin = (_header(scope, b"origin") or b"").decode("latin-1")
    if origin:
        if origin.strip().lower() == "null":
            return "cross-site request from origin 'null' (a sandboxed or local page) refused"
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 address)
            netloc = None
        if netloc != host.lower():
            return f"cross-site request from {origin[:80]!r} refused"
        return None
    fetch_site = (_header(scope, b"sec-fetch-site") or b"").decode("latin-1").strip().lower()
    if fetch_site == "cross-site":
        return "cross-site request (Sec-Fetch-Site: cross-site) refused"
    return None


class Guard:
    """ASGI middleware: API key, upload cap, Host and Origin checks, security headers (see the module)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body: int = 20 * 2**20,
                 allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @staticmethod
    def public(path: str) -> bool:
        """Paths served without the API key."""
        return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)

    def _key_ok(self, scope: Scope) -> str | None:
        """None when the request carries the key, else why not."""
        given = _header(scope, b"x-api-key")
        if given is None:
            auth = _header(scope, b"authorization") or b""
            scheme, _, token = auth.partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else None
        if not given:
            return "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
        if not hmac.compare_digest(given, self.key):
            return "wrong API key"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        send = self._headers(send, path)
        host = (_header(scope, b"host") or b"").decode("latin-1")
        if self.allowed_hosts is not None and host_name(host).lower() not in self.allowed_hosts:
            await reply(send, 400, f"this server answers to {', '.join(sorted(self.allowed_hosts))}, not Host {host[:80]!r}")
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            why = cross_site(scope, host)
            if why:
                await reply(send, 403, why)
                return
        if self.key is not None and not self.public(path):
            why = self._key_ok(scope)
            if why:
                await reply(send, 401, why, [(b"www-authenticate", b'Bearer realm="facemeta"')])
                return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await reply(send, 400, "bad Content-Length header")
                return
            if length > self.max_body:
                await reply(send, 413, UploadTooLarge(self.max_body).detail)
                return
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, counting the body as it arrives; past the cap, the answer is a 413 whatever the
        app made of the interrupted body."""
        seen = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    over = True
                    raise UploadTooLarge(self.max_body)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if over and message["type"].startswith("http.response") and not started:
                if message["type"] == "http.response.start" and message["status"] == 413:
                    started = True
                    await send(message)
                return  # the app answered something else to the cut body: replaced below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not (over and not started):
                raise
        if over and not started:
            await reply(send, 413, UploadTooLarge(self.max_body).detail)

    @staticmethod
    def _headers(send: Send, path: str) -> Send:
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"x-frame-options", b"DENY")]
        if path == "/" or path.startswith("/static/"):
            extra.append((b"content-security-policy", PAGE_CSP.encode()))
        elif path.startswith("/api/"):
            extra.append((b"cache-control", b"no-store"))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in extra if h[0] not in names]
            await send(message)

        return with_headers


async def reply(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a one-line JSON error ``{"error": ...}``."""
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
