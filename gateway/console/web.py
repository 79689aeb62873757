"""The console's HTTP hygiene: security headers on every response, small same-origin form posts.

``ConsoleGuard`` wraps the console's ASGI app:

- every response gets a strict Content-Security-Policy (``CSP``: scripts and styles only from the
  console's own static files, no inline script or style, images only from there or ``data:`` URLs,
  no frames, forms post only to the console), ``nosniff``, no framing, a referrer only to the
  console itself (with ``no-referrer`` Chromium sends ``Origin: null`` on the console's own forms),
  and ``Cache-Control: no-store`` unless it is a static file;
- a POST must be a form (``application/x-www-form-urlencoded``) of at most ``MAX_FORM_BYTES``, and
  when the browser names its ``Origin``, the console's own; the CSRF token inside is checked by
  the route (``Sessions.csrf_ok``).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
MAX_FORM_BYTES = 64 * 1024  # a form of job ids and a token; nothing posts more
FORM_TYPE = "application/x-www-form-urlencoded"


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` header (absent: yes) names the host it was sent to."""
    if origin is None:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == (host or "").lower()


class ConsoleGuard:
    """ASGI middleware: security headers out; size, type and origin of POSTs checked on the way in."""

    def __init__(self, app: ASGIApp, static_prefix: str = "/static/") -> None:
        self.app = app
        self.static_prefix = static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].removeprefix(scope.get("root_path", "")).startswith(self.static_prefix)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *SECURITY_HEADERS]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        if scope["method"] == "POST":
            refused = self._refuse(Headers(scope=scope))
            if refused is not None:
                return await refused(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)

    def _refuse(self, headers: Headers) -> PlainTextResponse | None:
        if not same_origin(headers.get("origin"), headers.get("host")):
            return PlainTextResponse("cross-origin form refused", status_code=403)
        if headers.get("content-type", "").partition(";")[0].strip().lower() != FORM_TYPE:
            return PlainTextResponse(f"a console POST is a form ({FORM_TYPE})", status_code=415)
        length = headers.get("content-length", "")
        if not length.isdigit():
            return PlainTextResponse("a console POST needs a Content-Length", status_code=411)
        if int(length) > MAX_FORM_BYTES:
            return PlainTextResponse(f"a console form is at most {MAX_FORM_BYTES} bytes", status_code=413)
        return None


async def read_form(request: Request) -> dict[str, list[str]]:
    """The POSTed form's fields (each a list of values); ``ConsoleGuard`` has checked its type and size."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_FORM_BYTES:  # a Content-Length that lied
            return {}
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=1000)
