"""Graceful shutdown, in the app's terms: the requests in flight get the shutdown timeout to finish,
then whatever is still queued is answered 503 (JSON), never left to the server to cut off.

uvicorn, on SIGTERM, stops accepting, waits its own graceful-shutdown timeout for open requests,
cancels the rest (answering them a text/plain 500) and only then runs the lifespan's shutdown. So
`tokenlean serve` (app/server.py) starts the drain at the signal, and gives uvicorn a longer
timeout than the drain's; a request cancelled anyway (one still uploading, say) is answered 503
by ShutdownGuard."""

from __future__ import annotations

import asyncio

from app.errors import Unavailable
from app.http_errors import response_for


class Drain:
    """Runs once, whoever asks first (the signal or the lifespan's end)."""

    def __init__(self, app, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s
        self.in_flight = 0  # HTTP requests being handled, counted by ShutdownGuard
        self._task: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    async def run(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(self._task)

    async def _drain(self) -> None:
        state, loop = self.app.state, asyncio.get_running_loop()
        state.ready = False  # /readyz: take this replica out of the load balancer
        deadline = loop.time() + self.timeout_s
        # Requests still being read or decoded join the queues meanwhile, and are served.
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        remaining = max(0.0, deadline - loop.time())
        await asyncio.gather(*(svc.batcher.close(remaining) for svc in state.services.values()))


class ShutdownGuard:
    """Counts requests in flight for the drain, and answers a request that the server cancels
    during shutdown, before its response started, with the JSON 503 of a closing batcher."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if started or not self.drain.started:
                raise
            # The task ends here either way; answering is all that is left to do.
            refusal = response_for(Unavailable("the server is shutting down"), scope["path"])
            await refusal(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
