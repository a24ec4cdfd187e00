"""`x-tokenlean-replica` on every response of a replica: which replica served the request."""

from __future__ import annotations

HEADER = b"x-tokenlean-replica"


class ReplicaHeader:
    """ASGI middleware adding the header to every HTTP response that passes through it."""

    def __init__(self, app, name: str):
        self.app, self.value = app, name.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, named_send)


def install(app, name: str) -> None:
    """Outside every other layer of a FastAPI app, its error middleware included, so that its
    500s (answered by the outermost layer, outside `add_middleware`'s) are named too. Before the
    app's first request: Starlette builds the stack then."""
    build = app.build_middleware_stack

    def build_named():
        return ReplicaHeader(build(), name)

    app.build_middleware_stack = build_named
