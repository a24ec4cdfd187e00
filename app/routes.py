"""HTTP routes. One POST /v1/<task> endpoint per registered task, each taking JSON (base64 images)
or multipart/form-data (file uploads) on the same path; both are described in the OpenAPI
document. This layer validates and decodes, then hands items and plans to the task's service: it
never sees a tensor."""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import schemas
from app.errors import (
    BadInput,
    InvalidInput,
    NotServed,
    Overloaded,
    ServiceError,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)
from app.http_errors import status_of
from app.images import decode_base64, decode_images
from app.tasks.base import Task, tasks

if TYPE_CHECKING:
    from app.service import TaskService

_COMPRESSION_FIELDS = {
    "compression": {"type": "string", "description": schemas.COMPRESSION_DOC},
    "method": {"type": "string"},
}
_FILE = {"type": "string", "format": "binary"}


def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), key.encode()):
        raise Unauthorized("missing or wrong bearer token")


# ------------------------------------------------------------------ request parsing


async def parse(request: Request, task: Task) -> tuple[BaseModel, dict[str, list[bytes]]]:
    """Validate a JSON or multipart body against the task's request model; returns it and the raw
    image bytes of each image field."""
    limits = request.app.state.settings.limits
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: dict[str, Any] = {}
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
            raise BadInput(f"body is not valid JSON: {str(exc)[:200]}") from exc
        if not isinstance(payload, dict):
            raise BadInput("body must be a JSON object")
    elif content_type == "multipart/form-data":
        form = await request.form(max_files=limits.max_candidates + 1, max_fields=limits.max_candidates + 16)
        payload = {}
        for name in set(form.keys()):
            values = form.getlist(name)
            uploads = [v for v in values if isinstance(v, UploadFile)]
            if uploads:
                if name not in task.file_fields:
                    raise InvalidInput(f"{name}: unexpected file")
                images[name] = [await u.read() for u in uploads]
                payload[name] = [""] * len(uploads) if name in task.list_fields else ""
            elif name in task.list_fields:
                payload[name] = list(values)
            else:
                payload[name] = values[0]
    else:
        raise UnsupportedMedia("send application/json or multipart/form-data")
    try:
        body = task.request.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc
    for name in task.file_fields:
        if name not in images and isinstance(getattr(body, name, None), str | list):
            value = getattr(body, name)
            raw = [value] if isinstance(value, str) else value
            images[name] = [decode_base64(v, limits.max_upload_bytes) for v in raw]
    return body, images


def service(request: Request, task: str) -> TaskService:
    state = request.app.state
    if state.load_failed:
        raise Unavailable("loading the models failed; see the server log")
    if not state.ready:
        raise Unavailable("models are still loading")
    if task not in state.services:
        raise NotServed(f"no model serves {task!r} on this server")
    return state.services[task]


# ------------------------------------------------------------------ reporting


def report(svc: TaskService, body, plan, trace, info, started: float) -> dict:
    t = trace.to_dict()
    return {
        "model": svc.cfg.checkpoint,
        "compression": {
            "requested": body.compression,
            "level": plan.level,
            "method": plan.method,
            "plan": plan.to_dict(),
        },
        "tokens": {
            "per_layer": t["tokens_per_layer"],
            "text_per_layer": t.get("text_tokens_per_layer"),
            "image_per_layer": t.get("image_tokens_per_layer"),
            "lookup_per_layer": t.get("lookup_tokens_per_layer"),
            "compressed_per_layer": t.get("compressed_tokens_per_layer"),
            "kept_ratio": t["kept_ratio"],
        },
        "flops": {"reduced": trace.flops, "full": trace.full_flops, "saved": t["flops_saved"]},
        "timings": {
            "queue_ms": round(info.queue_s * 1e3, 3),
            "inference_ms": round(info.inference_s * 1e3, 3),
            "total_ms": round((time.perf_counter() - started) * 1e3, 3),
        },
        "batch_size": info.size,
    }


@asynccontextmanager
async def observed(request: Request, task: str):
    """Counts the request and its latency under the level it ran at ('invalid' before a plan)."""
    started = time.perf_counter()
    state = {"level": "invalid", "started": started}
    status = "5xx"
    try:
        yield state
        status = "2xx"
    except ServiceError as exc:
        status = f"{status_of(exc)[0] // 100}xx"
        if isinstance(exc, Overloaded):
            request.app.state.metrics.rejected.labels(task).inc()
        raise
    except StarletteHTTPException as exc:  # e.g. multipart parsing limits
        status = f"{exc.status_code // 100}xx"
        raise
    finally:
        m = request.app.state.metrics
        m.requests.labels(task, state["level"], status).inc()
        m.request_duration.labels(task, state["level"]).observe(time.perf_counter() - started)


# ------------------------------------------------------------------ v1 endpoints


def task_endpoint(task: Task):
    async def endpoint(request: Request):
        async with observed(request, task.name) as state:
            svc = service(request, task.name)
            body, raw = await parse(request, task)
            limits = request.app.state.settings.limits

            async def pixels(data: list[bytes]):
                return await decode_images(data, limits, svc.bundle.preprocess)

            item = await task.decode(body, raw, svc.decode_context(pixels))
            plan = svc.plan_for(body.compression, body.method)
            state["level"] = svc.level_label(plan)
            result, trace, info = await svc.submit(plan, item)
            request.app.state.metrics.tokens_kept.labels(task.name, state["level"]).observe(trace.kept_ratio)
            return {**task.encode(body, result), **report(svc, body, plan, trace, info, state["started"])}

    endpoint.__doc__ = task.summary
    return endpoint


def openapi_body(task: Task) -> dict:
    form = {name: _FILE for name in task.file_fields if name not in task.list_fields}
    form |= task.form_fields | _COMPRESSION_FIELDS
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": task.request.model_json_schema(),
                    "example": task.json_example,
                },
                "multipart/form-data": {"schema": {"type": "object", "properties": form}},
            },
        }
    }


def v1_router() -> APIRouter:
    """The v1 API of every registered task, and /v1/models."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    for task in tasks().values():
        v1.add_api_route(
            f"/{task.name}",
            task_endpoint(task),
            methods=["POST"],
            response_model=task.response,
            summary=task.summary,
            name=task.name,
            openapi_extra=openapi_body(task),
        )

    @v1.get("/models")
    async def models(request: Request):
        """What is loaded: task, model, methods, levels with their FLOPs, backend."""
        return {"models": [svc.describe() for svc in request.app.state.services.values()]}

    return v1


# ------------------------------------------------------------------ operations

ops = APIRouter()


@ops.get("/healthz")
async def healthz():
    return {"status": "ok"}


@ops.get("/readyz")
async def readyz(request: Request):
    if request.app.state.load_failed:
        return JSONResponse({"status": "failed"}, status_code=503)
    if not request.app.state.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "ready", "tasks": sorted(request.app.state.services)}


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    if request.app.state.settings.protect_metrics:
        require_api_key(request)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
