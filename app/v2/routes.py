"""Open Inference Protocol v2 routes, beside /v1 in the same app: `GET /v2` (server metadata),
`/v2/health/live`, `/v2/health/ready`, and per served task (the model name is the task's name)
`GET /v2/models/{name}`, `GET /v2/models/{name}/ready`, `POST /v2/models/{name}/infer`.

An infer request goes the way of a /v1 request: the same API key, admission, limits, task
decoding, plan and micro-batcher (app/routes.py), only its body (app/v2/codec.py) and the mapping
to the task's fields (app/v2/mapping.py) differ. Errors are the same domain errors with the same
status codes (app/http_errors.py), in the protocol's body `{"error": "<message>"}`: the routes
under /v2/ are a mounted sub-application with its own error handlers, sharing the app's state."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import __version__
from app.errors import ClientClosed, NotServed, ServiceError, Unavailable, UnsupportedMedia
from app.http_errors import headers_of, status_of
from app.images import decode_images
from app.routes import observed, report, require_api_key, service
from app.tasks.base import Task, tasks
from app.v2 import codec, mapping

log = logging.getLogger("tokenlean")
EXTENSIONS = ["binary_tensor_data"]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    # A message may quote client input; a lone surrogate in it could not be encoded as UTF-8.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def response_for(exc: ServiceError) -> JSONResponse:
    return error_response(status_of(exc)[0], exc.message, headers_of(exc))


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error")


def server_metadata() -> dict:
    return {"name": "tokenlean", "version": __version__, "extensions": EXTENSIONS}


async def root_metadata(request: Request):
    """GET /v2 itself (the mount below answers /v2/...): server metadata, in the protocol's
    error body when the API key is missing."""
    try:
        require_api_key(request)
    except ServiceError as exc:
        return response_for(exc)
    return server_metadata()


# ------------------------------------------------------------------ models


def v2_task(request: Request, name: str) -> Task:
    """The task serving model `name` over v2; 404 for a name no task of this server has."""
    task = tasks().get(name)
    if task is None or not task.v2_outputs:
        settings = request.app.state.settings
        names = [n for n in settings.enabled() if tasks()[n].v2_outputs]
        raise NotServed(f"no model {name[:64]!r} on this server; models: {names}")
    return task


def model_metadata(task: Task) -> dict:
    return {
        "name": task.name,
        "platform": "tokenlean",
        "inputs": [mapping.metadata(spec) for spec in task.v2_inputs],
        "outputs": [mapping.metadata(spec) for spec in task.v2_outputs],
    }


async def read_body(request: Request) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMedia(
            f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed"
        )
    try:
        return await request.body()
    except ClientDisconnect as exc:
        raise ClientClosed("the client closed the connection before the request body was read") from exc


def build_router() -> APIRouter:
    router = APIRouter()
    protected = [Depends(require_api_key)]

    @router.get("/", dependencies=protected)
    async def metadata():
        return server_metadata()

    @router.get("/health/live")
    async def live():
        return {"live": True}

    @router.get("/health/ready")
    async def ready(request: Request):
        """Ready exactly when /readyz is: every model loaded and warmed up, not shutting down."""
        state = request.app.state
        if state.load_failed:
            raise Unavailable("loading the models failed; see the server log")
        if not state.ready:
            raise Unavailable("models are still loading" if not state.drain.started else "shutting down")
        return {"ready": True}

    @router.get("/models/{name}", dependencies=protected)
    async def model(request: Request, name: str):
        task = v2_task(request, name)
        service(request, task.name)  # 404 when not enabled, 503 while loading
        return model_metadata(task)

    @router.get("/models/{name}/ready", dependencies=protected)
    async def model_ready(request: Request, name: str):
        task = v2_task(request, name)
        service(request, task.name)
        return {"name": task.name, "ready": True}

    @router.post("/models/{name}/infer", dependencies=protected)
    async def infer(request: Request, name: str):
        task = v2_task(request, name)
        async with observed(request, task.name) as state:
            svc = service(request, task.name)
            svc.batcher.check_admission()  # refuse before reading the body when the server is full
            body_bytes = await read_body(request)
            limits, budget = request.app.state.settings.limits, request.app.state.decode_budget
            # no tensor of a task holds more elements than a request has candidates
            header_length = request.headers.get(codec.HEADER_LENGTH)
            infer_request = codec.decode_request(body_bytes, header_length, limits.max_candidates)
            body, raw = mapping.request_body(task, infer_request, limits.max_upload_bytes)

            async def pixels(data: list[bytes]):
                return await decode_images(data, limits, svc.bundle.preprocess, budget)

            plan = svc.plan_for(body.compression, body.method)  # before decoding: it is cheap
            item = await task.decode(body, raw, svc.decode_context(pixels))
            state["level"], state["method"] = svc.level_label(plan), plan.method
            deadline_s = body.deadline_ms / 1000 if body.deadline_ms else None
            result, trace, info = await svc.submit(plan, item, deadline_s=deadline_s)
            kept = request.app.state.metrics.tokens_kept
            kept.labels(task.name, state["level"], state["method"]).observe(trace.kept_ratio)
            fields = task.encode(body, result)
            parameters = mapping.response_parameters(report(svc, body, plan, trace, info, state["started"]))
            outputs = mapping.output_tensors(task, fields, infer_request)
            content, headers = codec.encode_response(task.name, infer_request.id, outputs, parameters)
            return Response(content, headers=headers)

    return router


def install(app: FastAPI) -> None:
    """Serve the protocol on `app`: GET /v2, and the rest under a /v2 mount with the protocol's
    error bodies (also for unknown paths and methods under /v2/)."""
    app.add_api_route("/v2", root_metadata, methods=["GET"], include_in_schema=False)
    v2 = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    v2.state = app.state  # settings, services, metrics, readiness: the app's own
    install_errors(v2)
    v2.include_router(build_router())
    app.mount("/v2", v2)
