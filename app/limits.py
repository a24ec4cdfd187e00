"""Refuse request bodies over the limit before they are read into memory, whether or not the
client sent Content-Length."""

from __future__ import annotations

from app.errors import TooLarge
from app.http_errors import response_for


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body exceeds {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await response_for(TooLarge(message))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(message)  # answered 413 by the error handler
            return msg

        await self.app(scope, limited_receive, send)
