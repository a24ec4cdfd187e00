"""Ray's HTTP proxy answers some requests itself, in plain text: a full queue (503, with
Retry-After from the deployment's backpressure config), no replica to take it (503), a proxy
timeout (408); and a request whose replica died with it gets no answer from the proxy at all
(its HTTP server then sends a plain-text 500). This middleware, run in the proxy, gives those the
app's JSON error body (/v1's, or the protocol's under /v2), and every 503 a Retry-After,
as every error of the single-process server has; the request a replica took down with it is
answered 503 `unavailable` (another replica, or its replacement, can take it again).

Ray loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.engines.ray_proxy:middlewares`
in the proxy's environment: `tokenlean serve --engine ray` sets it for the Ray instance it
starts; on a cluster, set it on every node before `ray start` (docs/deploying.md)."""

from __future__ import annotations

import json

from app.http_errors import protocol

CALLBACK = "app.engines.ray_proxy:middlewares"
LOST = "the replica serving this request stopped before answering; retry"
CODES = {408: "request_timeout", 429: "overloaded", 500: "internal_error", 504: "deadline_exceeded"}


def _header(message: dict, name: bytes) -> bytes | None:
    for key, value in message.get("headers", ()):
        if bytes(key).lower() == name:
            return bytes(value)
    return None


def error_body(status: int, text: str, retry_after: bool, path: str = "") -> bytes:
    """The app's error body for the request's path: /v1's {"error": {"code", "message"}}, or the
    Open Inference Protocol's {"error": message} under /v2 (app/http_errors.py)."""
    if status == 503:
        code = "overloaded" if retry_after else "unavailable"
    else:
        code = CODES.get(status, "http_error")
    message = text.strip() or f"HTTP {status} from the Ray Serve proxy"
    error = message if protocol(path) == "v2" else {"code": code, "message": message}
    return json.dumps({"error": error}).encode()


class JSONErrors:
    """Rewrites error responses that are not JSON (only the proxy's own are not)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []
        started = False

        async def json_send(message):
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                kind = _header(message, b"content-type") or b""
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if message.get("more_body", False):
                    return
                status = held["status"]
                retry_after = _header(held, b"retry-after")
                text = b"".join(chunks).decode("utf-8", "replace")
                body = error_body(status, text, retry_after is not None, scope.get("path", ""))
                headers = [
                    (k, v)
                    for k, v in held.get("headers", ())
                    if bytes(k).lower() not in (b"content-type", b"content-length")
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                if status == 503 and retry_after is None:
                    headers.append((b"retry-after", b"1"))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, json_send)
        if not started:  # the replica died with the request: the proxy has nothing to say
            body = error_body(503, LOST, False, scope.get("path", ""))
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send(
                {"type": "http.response.start", "status": 503, "headers": [*headers, (b"retry-after", b"1")]}
            )
            await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """The proxy callback Ray calls: the middlewares to wrap its proxy in."""
    from starlette.middleware import Middleware

    return [Middleware(JSONErrors)]
