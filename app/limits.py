"""Refuse request bodies over the limit before they are read into memory, whether or not the
client sent Content-Length, and bodies that do not arrive in time: a client sending half a body
(or a byte a minute) would otherwise hold its connection and its request forever."""

from __future__ import annotations

import asyncio

from app.errors import SlowBody, TooLarge
from app.http_errors import response_for


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body exceeds {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await response_for(TooLarge(message))(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s  # the whole body, from the request's arrival
        received, complete = 0, False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # after the body, only a disconnect can come: no deadline on that
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                # answered 408 by the error handler, with `Connection: close`
                raise SlowBody(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(message)  # answered 413 by the error handler
                complete = not msg.get("more_body", False)
            return msg

        await self.app(scope, limited_receive, send)
