"""The FastAPI application: models load in the background at start-up (/healthz answers at once,
/readyz once every model is loaded and warmed up); shutdown finishes the requests in flight
within the shutdown timeout and answers the rest 503."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__, http_errors
from app.images import PixelBudget
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics
from app.playground import install as install_playground
from app.routes import ops, v1_router
from app.service import TaskService, inference_thread
from app.settings import Settings
from app.shutdown import Drain, ShutdownGuard
from app.tasks.base import tasks
from app.v2.routes import install as install_v2
from models.reduction.registry import method_names

log = logging.getLogger("tokenlean")
ServiceFactory = Callable[[str, Settings, Metrics], TaskService]


def default_factory(task: str, settings: Settings, metrics: Metrics) -> TaskService:
    return TaskService(tasks()[task], settings.models[task], settings, metrics, settings.resolved_device())


def load_services(app: FastAPI, factory: ServiceFactory) -> None:
    settings, metrics = app.state.settings, app.state.metrics
    for task in settings.enabled():
        started = time.perf_counter()
        svc = factory(task, settings, metrics)
        if settings.warmup:
            svc.warm_up()
        metrics.model_load.labels(task).set(time.perf_counter() - started)
        app.state.services[task] = svc
        log.info("loaded %s from %s in %.1fs", task, svc.cfg.checkpoint, time.perf_counter() - started)


def create_app(settings: Settings | None = None, factory: ServiceFactory = default_factory) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        async def start() -> None:
            try:
                await loop.run_in_executor(inference_thread(), load_services, app, factory)
            except Exception:
                log.exception("loading models failed")
                app.state.load_failed = True
                return
            if app.state.drain.started:  # stopped while loading
                return
            for svc in app.state.services.values():
                svc.batcher.start()
            app.state.ready = True

        loader = loop.create_task(start())
        yield
        loader.cancel()
        await app.state.drain.run()  # already under way when `tokenlean serve` got a signal

    app = FastAPI(
        title="tokenlean",
        version=__version__,
        description="Visual question answering, image-text retrieval and image classification with "
        "per-request token pruning and merging.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.services = {}
    app.state.ready = False
    app.state.load_failed = False
    app.state.decode_budget = PixelBudget(settings.limits.decode_budget_pixels)
    app.state.drain = Drain(app, settings.shutdown_timeout_s)
    http_errors.install(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.limits.max_request_bytes,
        timeout_s=settings.limits.body_timeout_s,
    )
    app.add_middleware(ShutdownGuard, drain=app.state.drain)  # the outermost: added last
    app.include_router(ops)
    app.include_router(v1_router(settings.limits))
    install_v2(app)  # the Open Inference Protocol v2: /v2, /v2/health/..., /v2/models/...
    install_playground(app)  # the page at /playground (and / pointing there)
    app.openapi = lambda: openapi(app)
    return app


BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "`Authorization: Bearer <token>`, required on /v1 and /v2 routes (all but "
    "/v2/health/*) when the server sets TOKENLEAN_API_KEY (and on /metrics with "
    "TOKENLEAN_PROTECT_METRICS)",
}


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the reduction methods registered now listed on every request, and
    the bearer scheme on the routes that need it."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": BEARER}
        settings = app.state.settings
        methods = list(method_names())
        for name, path in schema["paths"].items():
            for operation in path.values():
                protected = name.startswith("/v1/") or (name == "/metrics" and settings.protect_metrics)
                if protected and settings.api_key is not None:
                    operation["security"] = [{"bearer": []}]
                for content in operation.get("requestBody", {}).get("content", {}).values():
                    props = content.get("schema", {}).get("properties", {})
                    if "method" in props:
                        props["method"]["description"] = (
                            f"reduction method, one of {methods} that applies to the model "
                            "(GET /v1/models lists them); default: the model's"
                        )
                        props["method"]["examples"] = methods
        app.openapi_schema = schema
    return app.openapi_schema
