"""Open Inference Protocol v2 routes, beside /v1 in the same app: `GET /v2` (server metadata),
`/v2/health/live`, `/v2/health/ready`, and per served task (the model name is the task's name)
`GET /v2/models/{name}`, `GET /v2/models/{name}/ready`, `POST /v2/models/{name}/infer`.

An infer request goes the way of a /v1 request: the same API key, admission (before routing, in
app/limits.py, and in app/routes.py's `admitted`), limits, task decoding, plan and micro-batcher
(app/routes.py's `answer`), only its body (app/v2/codec.py) and the mapping to the task's fields
(app/v2/mapping.py) differ. Errors are the same domain errors with the same status codes and
headers (app/http_errors.py), which answers every path under /v2 in the protocol's body
`{"error": "<message>"}`: the routes under /v2/ are a mounted sub-application with the same error
handlers as the app, sharing its state."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from app import __version__, http_errors
from app.errors import ClientClosed, NotServed, Unavailable, UnsupportedMedia
from app.routes import admitted, answer, observed, require_api_key, service
from app.tasks.base import Task, tasks
from app.v2 import codec, mapping

EXTENSIONS = ["binary_tensor_data"]


def server_metadata() -> dict:
    return {"name": "tokenlean", "version": __version__, "extensions": EXTENSIONS}


async def root_metadata():
    """GET /v2 itself (the mount below answers /v2/...): server metadata."""
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
            svc = admitted(request, task.name)
            limits = request.app.state.settings.limits
            data, header_length = await read_body(request), request.headers.get(codec.HEADER_LENGTH)
            # no tensor of a task holds more elements than a request has candidates
            infer_request = codec.decode_request(data, header_length, limits.max_candidates)
            body, raw = mapping.request_body(task, infer_request, limits.max_upload_bytes)
            fields, summary = await answer(request, svc, body, raw, state)
            outputs = mapping.output_tensors(task, fields, infer_request)
            parameters = mapping.response_parameters(summary)
            content, headers = codec.encode_response(task.name, infer_request.id, outputs, parameters)
            return Response(content, headers=headers)

    return router


def install(app: FastAPI) -> None:
    """Serve the protocol on `app`: GET /v2, and the rest under a /v2 mount with the protocol's
    error bodies (also for unknown paths and methods under /v2/)."""
    app.add_api_route(
        "/v2",
        root_metadata,
        methods=["GET"],
        dependencies=[Depends(require_api_key)],
        include_in_schema=False,
    )
    v2 = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    v2.state = app.state  # settings, services, metrics, readiness: the app's own
    http_errors.install(v2)  # the app's handlers: under /v2 they answer in the protocol's body
    v2.include_router(build_router())
    app.mount("/v2", v2)
