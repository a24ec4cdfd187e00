"""uvicorn, run the way the app's shutdown needs (app/shutdown.py): the drain starts at the signal,
uvicorn's own graceful-shutdown timeout is longer than the drain's, and a finished shutdown exits
0 instead of re-raising the signal (uvicorn does, so every SIGTERM ended in 143)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading

import uvicorn

# What uvicorn's timeout adds to the drain's: time to write the 503s of the requests the drain
# gave up on, before uvicorn cancels what is left.
GRACE_S = 5
STARTUP_FAILURE = 3  # uvicorn's exit code when the server could not start


def uvicorn_shutdown_timeout(settings) -> int:
    """Seconds uvicorn waits for open requests before cancelling them (whole seconds only)."""
    return int(settings.shutdown_timeout_s) + 1 + GRACE_S


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets=None) -> None:
        draining = asyncio.ensure_future(self.drain.run())
        await super().shutdown(sockets)  # runs the lifespan's end, which waits for the drain
        await draining

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run(app, settings, log_config: dict) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=uvicorn_shutdown_timeout(settings),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
    )
    server = Server(config, app.state.drain)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
