"""Ray's HTTP proxy answers some requests itself, in plain text: a full queue (503, with
Retry-After from the deployment's backpressure config), no replica to take it (503), a proxy
timeout (408); and a request whose replica died with it gets no answer from the proxy at all
(its HTTP server then sends a plain-text 500). This middleware, run in the proxy, gives those the
app's JSON error body (/v1's, or the protocol's under /v2), and every 503 a Retry-After,
as every error of the single-process server has; the request a replica took down with it is
answered 503 `unavailable` (another replica, or its replacement, can take it again), also when
the replica died between its response's start and its body: every response is held until its last
body message (the app never streams; its answers are small JSON), so a client never gets a
truncated one.

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
    """Rewrites error responses that are not JSON (only the proxy's own are not), and answers
    503 a request whose response did not arrive whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list[dict] = []  # the response so far: its start, then its body messages
        done = False

        async def hold(message):
            nonlocal done
            if done:
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                await send_whole(held, send, scope.get("path", ""))

        await self.app(scope, receive, hold)
        if not done:  # the replica died with the request, before or while answering it
            await send_error(send, 503, error_body(503, LOST, False, scope.get("path", "")), [])


async def send_whole(messages: list[dict], send, path: str) -> None:
    start, bodies = messages[0], messages[1:]
    kind = _header(start, b"content-type") or b""
    if start["status"] < 400 or kind.startswith(b"application/json"):  # the app's own answer
        for message in messages:
            await send(message)
        return
    status = start["status"]
    retry_after = _header(start, b"retry-after")
    text = b"".join(bytes(m.get("body", b"")) for m in bodies).decode("utf-8", "replace")
    kept = [
        (k, v)
        for k, v in start.get("headers", ())
        if bytes(k).lower() not in (b"content-type", b"content-length", b"retry-after")
    ]
    if retry_after is not None:
        kept.append((b"retry-after", retry_after))
    await send_error(send, status, error_body(status, text, retry_after is not None, path), kept)


async def send_error(send, status: int, body: bytes, headers: list) -> None:
    """A JSON error response; every 503 says when to retry."""
    headers = [*headers, (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 503 and not any(bytes(k).lower() == b"retry-after" for k, _ in headers):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """The proxy callback Ray calls: the middlewares to wrap its proxy in."""
    from starlette.middleware import Middleware

    return [Middleware(JSONErrors)]
