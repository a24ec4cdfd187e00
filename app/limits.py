"""What the server refuses before a request body is read, in the order it checks:

- more open connections (or requests in flight) than `max_connections` (`tokenlean serve` hands
  the server's connection set over in app/server.py): 503 with `Retry-After` and
  `Connection: close`, in JSON like every other error, instead of uvicorn's plain-text 503;
- a Content-Length over the body limit: 413;
- a task request (`POST /v1/<task>`, `POST /v2/models/<task>/infer`) the model thread has no
  room for (the predicted wait ahead is past the maximum queue wait, app/batching.py): 503 with
  `Retry-After`, before routing, validation or the body, so that under overload a refusal costs
  tens of microseconds of the event loop; an admitted one holds a reservation while its body is
  read.

Each refusal has the error body of the request's API (app/http_errors.py: /v1's, or the Open
Inference Protocol's under /v2).

Then it refuses bodies over the limit while they are read, whether or not the client sent
Content-Length, and bodies that do not arrive in time: a client sending half a body (or a byte a
minute) would otherwise hold its connection and its request forever."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from app.batching import arrival
from app.errors import Overloaded, SlowBody, TooLarge, Unavailable
from app.http_errors import response_for

log = logging.getLogger("tokenlean")
CAP_LOG_EVERY_S = 10.0  # connection-cap refusals are logged once per this, with their count


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self._capped, self._capped_logged = 0, 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        arrival.set(started)  # waits and deadlines count from here (app/batching.py)
        refusal = self._over_capacity(scope, started)
        if refusal is not None:
            return await refusal(scope, receive, send)
        message = f"request body exceeds {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await response_for(TooLarge(message), scope["path"])(scope, receive, send)
        refusal, held = admission(scope, started)
        if refusal is not None:
            return await refusal(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s  # the whole body, from the request's arrival
        received, complete = 0, False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # after the body, only a disconnect can come: no deadline on that
                return await receive()
            # While it waits for its body, a request holds no place ahead of others: 50 stalled
            # uploads must not fill the backlog (a body already received is back at once).
            waiting = held is not None and held.held
            if waiting:
                held.release()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                # answered 408 by the error handler, with `Connection: close`
                raise SlowBody(f"the request body did not arrive within {self.timeout_s:g} s") from None
            finally:
                if waiting:
                    held.retake()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(message)  # answered 413 by the error handler
                complete = not msg.get("more_body", False)
            return msg

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if held is not None:  # ended before it was queued (invalid, too large, gone ...)
                held.release()

    def _over_capacity(self, scope, started: float):
        """The connection cap: refused like uvicorn's `limit_concurrency` (which counts the
        connection asking, and the requests in flight but not this one), but in JSON, with
        Retry-After, and the connection closed to shed it."""
        state = scope["app"].state if "app" in scope else None
        connections = getattr(state, "connections", None)
        if connections is None:
            return None
        cap = state.settings.max_connections
        if len(connections) < cap and state.drain.in_flight <= cap:
            return None
        self._capped += 1
        if started - self._capped_logged >= CAP_LOG_EVERY_S:  # not one log line per refusal
            log.warning(
                "connection cap: %d connections open (at most %d); %d requests refused since the last line",
                len(connections),
                cap,
                self._capped,
            )
            self._capped, self._capped_logged = 0, started
        error = Overloaded(f"the server has too many open connections (at most {cap}); retry later", 1)
        count_refusal(scope, started)
        response = response_for(error, scope["path"])
        response.headers["connection"] = "close"
        return response


def task_of(path: str) -> str | None:
    """The task a POST to `path` asks for: /v1/<task>, or /v2/models/<task>/infer (the protocol's
    model name is the task's name); None for any other path."""
    if path.startswith("/v1/"):
        return path[4:]
    parts = path.split("/")  # "", "v2", "models", <task>, "infer"
    if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "infer":
        return parts[3]
    return None


def _task_service(scope):
    """The service a task request goes to, when it is one that admission may refuse."""
    if scope.get("method") != "POST" or "app" not in scope:
        return None
    task = task_of(scope.get("path", ""))
    if task is None:
        return None
    state = scope["app"].state
    if not getattr(state, "ready", False):
        return None  # the route answers: still loading
    return state.services.get(task)


def _authorized(scope, key: str | None) -> bool:
    if key is None:
        return True
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())
    return False


def admission(scope, started: float):
    """(the JSON 503 for a task request the model thread has no room for, None), or (None, the
    reservation of an admitted one, or None when the route decides: an unauthenticated request
    gets its 401 there, a request to a task not served its 404)."""
    svc = _task_service(scope)
    if svc is None or not _authorized(scope, scope["app"].state.settings.api_key):
        return None, None
    try:
        return None, svc.batcher.admit_early()
    except Overloaded as exc:
        count_refusal(scope, started, svc.task.name)
        return response_for(exc, scope["path"]), None
    except Unavailable:  # shutting down: the route answers it, as any request in the drain
        return None, None


def count_refusal(scope, started: float, task: str | None = None) -> None:
    """Counted as the route counts a refusal before a plan is chosen (app/routes.py: observed)."""
    if task is None:
        svc = _task_service(scope)
        if svc is None:
            return
        task = svc.task.name
    m = scope["app"].state.metrics
    m.rejected.labels(task).inc()
    m.requests.labels(task, "invalid", "invalid", "503").inc()
    m.request_duration.labels(task, "invalid", "invalid").observe(time.perf_counter() - started)
