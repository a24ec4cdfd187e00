"""uvicorn, run the way the app's shutdown needs (app/shutdown.py): the drain starts at the signal,
uvicorn's own graceful-shutdown timeout is longer than the drain's, and a finished shutdown exits
0 instead of re-raising the signal (uvicorn does, so every SIGTERM ended in 143).

The connection cap (`max_connections`) is the app's, not uvicorn's `limit_concurrency`: uvicorn
answers past it in plain text without Retry-After and logs a warning per refused request (a log
line per request at the very moment the server is overloaded); the app is handed uvicorn's set
of open connections and refuses in JSON (app/limits.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import threading

import uvicorn

# What uvicorn's timeout adds to the drain's: time to write the 503s of the requests the drain
# gave up on, before uvicorn cancels what is left.
GRACE_S = 5
STARTUP_FAILURE = 3  # uvicorn's exit code when the server could not start
SWITCH_INTERVAL_S = 0.001


async def freeze_heap_when_ready(state, poll_s: float = 0.1) -> None:
    """Once the models are loaded, move every object alive then (models, libraries: hundreds of
    thousands) out of the garbage collector's sight. A full collection scanned them all, and
    stopped the process for 200-250 ms at a time under load, every few seconds at 1,400
    requests/s: every answer of those moments, refusals too, was late by that much."""
    while not (state.ready or state.load_failed):
        await asyncio.sleep(poll_s)
    gc.collect()
    gc.freeze()


def uvicorn_shutdown_timeout(settings) -> int:
    """Seconds uvicorn waits for open requests before cancelling them (whole seconds only)."""
    return int(settings.shutdown_timeout_s) + 1 + GRACE_S


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._freezing = asyncio.ensure_future(freeze_heap_when_ready(self.drain.app.state))

    async def shutdown(self, sockets=None) -> None:
        freezing = getattr(self, "_freezing", None)
        if freezing is not None:
            freezing.cancel()  # (stopped while loading)
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
    # The event loop (HTTP) and the model thread share the GIL: a thread waiting for it gets it
    # after this long at most (Python's default is 5 ms). Under overload the loop answers
    # refusals in ms; with 5 ms slices of the model thread's Python code in between, they waited.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=uvicorn_shutdown_timeout(settings),
        timeout_keep_alive=settings.keep_alive_s,
    )
    server = Server(config, app.state.drain)
    app.state.connections = server.server_state.connections  # for the connection cap
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
