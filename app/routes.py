"""HTTP routes. Each v1 endpoint accepts JSON (base64 images) or multipart/form-data (file
uploads) on the same path; both are described in the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import schemas
from app.errors import APIError, bad_request, invalid, unavailable, unsupported_media
from app.images import decode_base64, header_pixels, open_image
from app.service import ClassifyItem, RetrievalItem, TaskService, VQAItem
from models.plan import ReductionPlan

INLINE_PIXELS = 1_000_000  # images up to this many pixels in total are decoded on the event loop
PNG_EXAMPLE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def _request_body(model: type[BaseModel], json_example: dict, form_fields: dict[str, dict]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema(), "example": json_example},
                "multipart/form-data": {"schema": {"type": "object", "properties": form_fields}},
            },
        }
    }


_FILE = {"type": "string", "format": "binary"}
_COMPRESSION_FIELDS = {
    "compression": {"type": "string", "description": schemas.COMPRESSION_DOC},
    "method": {"type": "string"},
}


def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
ops = APIRouter()


# ------------------------------------------------------------------ request parsing


async def parse(request: Request, model: type[BaseModel], files: tuple[str, ...]) -> tuple[BaseModel, dict]:
    """Validate a JSON or multipart body against `model`; returns it and the raw image bytes."""
    limits = request.app.state.settings.limits
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: dict[str, Any] = {}
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
            raise bad_request(f"body is not valid JSON: {str(exc)[:200]}") from exc
        if not isinstance(payload, dict):
            raise bad_request("body must be a JSON object")
    elif content_type == "multipart/form-data":
        form = await request.form(max_files=limits.max_candidates + 1, max_fields=limits.max_candidates + 16)
        payload = {}
        for name in set(form.keys()):
            values = form.getlist(name)
            uploads = [v for v in values if isinstance(v, UploadFile)]
            if uploads:
                if name not in files:
                    raise invalid(f"{name}: unexpected file")
                images[name] = [await u.read() for u in uploads]
                payload[name] = "" if name in ("image",) else [""] * len(uploads)
            elif name in ("texts", "images"):
                payload[name] = list(values)
            else:
                payload[name] = values[0]
    else:
        raise unsupported_media("send application/json or multipart/form-data")
    try:
        body = model.model_validate(payload)
    except ValidationError as exc:
        raise invalid("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
    for name in files:
        if name not in images and isinstance(getattr(body, name, None), str | list):
            value = getattr(body, name)
            raw = [value] if isinstance(value, str) else value
            images[name] = [decode_base64(v, limits.max_upload_bytes) for v in raw]
    return body, images


async def load_pixels(request: Request, raw: list[bytes], preprocess) -> torch.Tensor:
    """Decode and resize images one at a time, in a worker thread: the event loop stays free and
    at most one full-size image is in memory. The pixel budget covers the whole request."""
    limits = request.app.state.settings.limits

    def work() -> torch.Tensor:
        budget, tensors = limits.max_request_pixels, []
        for data in raw:
            image = open_image(data, limits.max_upload_bytes, min(limits.max_image_pixels, budget))
            budget -= image.width * image.height
            tensors.append(preprocess([image]))
            del image
        return torch.cat(tensors)

    if sum(header_pixels(data) for data in raw) <= INLINE_PIXELS:
        return work()  # small images: decoding takes less than the hop to a thread
    return await asyncio.to_thread(work)


def service(request: Request, task: str) -> TaskService:
    state = request.app.state
    if state.load_failed:
        raise unavailable("loading the models failed; see the server log")
    if not state.ready:
        raise unavailable("models are still loading")
    if task not in state.services:
        raise APIError(404, "not_found", f"no model serves {task!r} on this server")
    return state.services[task]


def check_top_k(request: Request, top_k: int) -> None:
    if top_k > request.app.state.settings.limits.max_top_k:
        raise invalid(f"top_k: at most {request.app.state.settings.limits.max_top_k}")


# ------------------------------------------------------------------ reporting


def report(svc: TaskService, body, plan: ReductionPlan, trace, info, started: float) -> dict:
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
    except APIError as exc:
        status = f"{exc.status // 100}xx"
        if exc.status == 503 and exc.code == "overloaded":
            request.app.state.metrics.rejected.labels(task).inc()
        raise
    except StarletteHTTPException as exc:  # e.g. multipart parsing limits
        status = f"{exc.status_code // 100}xx"
        raise
    finally:
        m = request.app.state.metrics
        m.requests.labels(task, state["level"], status).inc()
        m.request_duration.labels(task, state["level"]).observe(time.perf_counter() - started)


async def run(request: Request, svc: TaskService, body, state: dict, item, weight: int = 1):
    plan = svc.plan_for(body.compression, body.method)
    state["level"] = svc.level_label(plan)
    (result, trace), info = await svc.submit(plan, item, weight)
    request.app.state.metrics.tokens_kept.labels(svc.task, state["level"]).observe(trace.kept_ratio)
    return plan, result, trace, info


# ------------------------------------------------------------------ v1 endpoints


@v1.post(
    "/vqa",
    response_model=schemas.VQAResponse,
    openapi_extra=_request_body(
        schemas.VQARequest,
        {"image": PNG_EXAMPLE, "question": "what color is the shape?", "compression": "medium"},
        {"image": _FILE, "question": {"type": "string"}, "top_k": {"type": "integer"}, **_COMPRESSION_FIELDS},
    ),
)
async def vqa(request: Request):
    """Answer a question about an image."""

    def item(svc, body, pixels):
        limit = request.app.state.settings.limits.max_question_chars
        if len(body.question) > limit:
            raise invalid(f"question: at most {limit} characters")
        return VQAItem(pixels, body.question, body.top_k, svc.text_length([body.question]))

    return await labelled(request, "vqa", schemas.VQARequest, item, ("answer", "answers"))


@v1.post(
    "/classify",
    response_model=schemas.ClassifyResponse,
    openapi_extra=_request_body(
        schemas.ClassifyRequest,
        {"image": PNG_EXAMPLE, "compression": 0.3},
        {"image": _FILE, "top_k": {"type": "integer"}, **_COMPRESSION_FIELDS},
    ),
)
async def classify(request: Request):
    """Classify an image."""

    def item(svc, body, pixels):
        return ClassifyItem(pixels, body.top_k)

    return await labelled(request, "classify", schemas.ClassifyRequest, item, ("label", "labels"))


async def labelled(request: Request, task: str, schema, make_item, keys: tuple[str, str]) -> dict:
    """One image (+ fields) in, top-k scored labels out: VQA and classification."""
    async with observed(request, task) as state:
        svc = service(request, task)
        body, raw = await parse(request, schema, ("image",))
        check_top_k(request, body.top_k)
        pixels = await load_pixels(request, raw["image"][:1], svc.pipeline.preprocess)
        item = make_item(svc, body, pixels[0])
        plan, labels, trace, info = await run(request, svc, body, state, item)
        return {
            keys[0]: labels[0].label,
            keys[1]: [{"label": a.label, "score": a.score} for a in labels],
            **report(svc, body, plan, trace, info, state["started"]),
        }


@v1.post(
    "/retrieval",
    response_model=schemas.RetrievalResponse,
    openapi_extra=_request_body(
        schemas.RetrievalRequest,
        {"image": PNG_EXAMPLE, "texts": ["a red circle", "a blue triangle"], "compression": "low"},
        {
            "image": _FILE,
            "texts": {"type": "array", "items": {"type": "string"}},
            "text": {"type": "string"},
            "images": {"type": "array", "items": _FILE},
            **_COMPRESSION_FIELDS,
        },
    ),
)
async def retrieval(request: Request):
    """Rank candidate texts for an image, or candidate images for a text."""
    async with observed(request, "retrieval") as state:
        svc = service(request, "retrieval")
        body, raw = await parse(request, schemas.RetrievalRequest, ("image", "images"))
        limits = request.app.state.settings.limits
        candidates = body.texts if body.texts is not None else raw["images"]
        if len(candidates) > limits.max_candidates:
            raise invalid(f"at most {limits.max_candidates} candidates per request")
        texts = body.texts or [body.text]
        if any(len(t) > limits.max_question_chars for t in texts):
            raise invalid(f"texts: at most {limits.max_question_chars} characters each")
        preprocess = svc.pipeline.preprocess
        if body.texts is not None:
            pixels = (await load_pixels(request, raw["image"][:1], preprocess)).expand(
                len(body.texts), -1, -1, -1
            )
            item = RetrievalItem(pixels, tuple(body.texts), tuple(body.texts), svc.text_length(texts))
        else:
            pixels = await load_pixels(request, raw["images"], preprocess)
            item = RetrievalItem(
                pixels, (body.text,) * len(pixels), tuple(range(len(pixels))), svc.text_length(texts)
            )
        plan, ranking, trace, info = await run(request, svc, body, state, item, weight=len(item.texts))
        rows = [
            {
                "index": r["index"],
                "text": r["item"] if body.texts is not None else None,
                "score": r["score"],
                "probability": r["probability"],
            }
            for r in ranking
        ]
        return {"ranking": rows, **report(svc, body, plan, trace, info, state["started"])}


@v1.get("/models")
async def models(request: Request):
    """What is loaded: task, model, methods, levels with their FLOPs, backend."""
    return {"models": [svc.describe() for svc in request.app.state.services.values()]}


# ------------------------------------------------------------------ operations


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
