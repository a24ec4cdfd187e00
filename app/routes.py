"""HTTP routes. One POST /v1/<task> endpoint per registered task, each taking JSON (base64 images)
or multipart/form-data (file uploads) on the same path; both are described in the OpenAPI
document. This layer validates and decodes, then hands items and plans to the task's service: it
never sees a tensor."""

from __future__ import annotations

import asyncio
import json
import logging
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
from starlette.requests import ClientDisconnect

from app import schemas
from app.budget import Budgeted
from app.errors import (
    BadInput,
    ClientClosed,
    InvalidInput,
    NotServed,
    Overloaded,
    ServiceError,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)
from app.http_errors import error_responses, status_of
from app.images import decode_base64, decode_images
from app.settings import LimitSettings
from app.tasks.base import Task, tasks

if TYPE_CHECKING:
    from app.service import TaskService

log = logging.getLogger("tokenlean")

_COMPRESSION_FIELDS = {
    "compression": {"type": "string", "description": schemas.COMPRESSION_DOC},
    "method": {"type": "string"},
    "deadline_ms": {"type": "integer", "description": schemas.DEADLINE_DOC},
    "latency_budget_ms": {"type": "integer", "description": schemas.BUDGET_DOC},
    "return_token_map": {"type": "boolean", "description": schemas.TOKEN_MAP_DOC},
    "token_map_layer": {"type": "integer", "description": schemas.TOKEN_MAP_LAYER_DOC},
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
    try:
        return await _parse(request, task)
    except ClientDisconnect as exc:
        raise ClientClosed("the client closed the connection before the request body was read") from exc


async def _parse(request: Request, task: Task) -> tuple[BaseModel, dict[str, list[bytes]]]:
    limits = request.app.state.settings.limits
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: dict[str, Any] = {}
    if content_type == "application/json":
        body = await request.body()
        try:
            # strict=False: line breaks inside strings, as `"$(base64 image.png)"` in a shell puts
            # them into base64 images (the decoder ignores whitespace)
            payload = json.loads(body, strict=False)
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
    """Counts the request, by status code, and its latency under the level and method it ran at
    ('invalid' for both before a plan)."""
    started = time.perf_counter()
    state = {"level": "invalid", "method": "invalid", "started": started}
    status = 500
    try:
        yield state
        status = 200
    except ServiceError as exc:
        status = status_of(exc)[0]
        if isinstance(exc, Overloaded):
            request.app.state.metrics.rejected.labels(task).inc()
        if isinstance(exc, ClientClosed):  # not a server error: one line, no traceback
            log.info("%s %s: %s", request.method, request.url.path, exc.message)
        raise
    except StarletteHTTPException as exc:  # e.g. multipart parsing limits
        status = exc.status_code
        raise
    except asyncio.CancelledError:  # only shutdown cancels a request; app/shutdown.py answers 503
        status = 503
        raise
    finally:
        m, labels = request.app.state.metrics, (task, state["level"], state["method"])
        m.requests.labels(*labels, str(status)).inc()
        m.request_duration.labels(*labels).observe(time.perf_counter() - started)


# ------------------------------------------------------------------ running a task request
# What /v1/<task> and /v2/models/<task>/infer share; only reading the body and writing the answer
# differ. Inside `observed`: `admitted`, then read the body into the task's request, then `answer`.


def admitted(request: Request, task: str) -> TaskService:
    """The task's service, refusing the request (Overloaded, 503) before its body is read when
    the server is full."""
    svc = service(request, task)
    svc.batcher.check_admission()
    return svc


async def answer(
    request: Request, svc: TaskService, body: BaseModel, raw: dict[str, list[bytes]], state: dict
) -> tuple[dict, dict]:
    """A parsed task request (its body and raw image bytes) through plan, decoding and the
    micro-batcher; returns the task's response fields and the report, and labels `state` (of
    `observed`) with the level and method it ran at."""
    task = svc.task
    limits, budget = request.app.state.settings.limits, request.app.state.decode_budget

    async def pixels(data: list[bytes]):
        return await decode_images(data, limits, svc.bundle.preprocess, budget)

    settings = request.app.state.settings
    budgeted = Budgeted.of(body, settings.latency_budget_ms, settings.overload_policy)
    # before decoding: it is cheap; `auto` chooses once the item (its size, its key) is known
    plan = None if budgeted.auto else svc.plan_for(body.compression, body.method)
    item = await task.decode(body, raw, svc.decode_context(pixels))
    plan = budgeted.plan(svc, task.batch_key(item), task.weight(item), plan, body.method)
    state["level"], state["method"] = svc.level_label(plan), plan.method
    deadline_s = body.deadline_ms / 1000 if body.deadline_ms else None
    result, trace, info = await svc.submit(plan, item, deadline_s=deadline_s)
    kept = request.app.state.metrics.tokens_kept
    kept.labels(task.name, state["level"], state["method"]).observe(trace.kept_ratio)
    summary = report(svc, body, plan, trace, info, state["started"])
    summary["latency"] = budgeted.settle(svc)
    return task.encode(body, result), summary


# ------------------------------------------------------------------ v1 endpoints


def task_endpoint(task: Task):
    async def endpoint(request: Request):
        async with observed(request, task.name) as state:
            svc = admitted(request, task.name)
            body, raw = await parse(request, task)
            fields, summary = await answer(request, svc, body, raw, state)
            return {**fields, **summary}

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


def limits_doc(limits: LimitSettings) -> str:
    """This server's input limits, as the OpenAPI description of every task route states them."""
    return (
        "Limits on this server (`TOKENLEAN_LIMITS__*`): "
        f"the body at most {limits.max_request_bytes} bytes, and received within "
        f"{limits.body_timeout_s:g} s (else 408); each image at most {limits.max_upload_bytes} bytes "
        f"and {limits.max_image_pixels} pixels, the images of one request at most "
        f"{limits.max_request_pixels} pixels in total (413, from the image headers, before decoding); "
        f"a question or text at most {limits.max_question_chars} characters, at most "
        f"{limits.max_candidates} candidates, `top_k` at most {limits.max_top_k} (422)."
    )


TASK_ERRORS = (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)


def v1_router(limits: LimitSettings) -> APIRouter:
    """The v1 API of every registered task, and /v1/models."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    for task in tasks().values():
        v1.add_api_route(
            f"/{task.name}",
            task_endpoint(task),
            methods=["POST"],
            response_model=task.response,
            summary=task.summary,
            description=f"{task.summary} JSON (base64 images) or multipart/form-data (image files).\n\n"
            + limits_doc(limits),
            name=task.name,
            responses=error_responses(*TASK_ERRORS),
            openapi_extra=openapi_body(task),
        )

    @v1.get("/models", responses=error_responses(401))
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
