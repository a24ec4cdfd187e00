"""Service settings: environment variables (TOKENLEAN_...) and `tokenlean serve` flags.

Nested fields use `__` in environment variables, e.g.
TOKENLEAN_MODELS__VQA__CHECKPOINT=dandelin/vilt-b32-finetuned-vqa; on the command line, `.` for
nested models (`--limits.max-top-k 5`) and JSON for the per-task table
(`--models '{"vqa": {"checkpoint": "dandelin/vilt-b32-finetuned-vqa"}}'`). Every registered task
has an entry; tasks not named keep their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CHECKPOINTS = Path(__file__).resolve().parents[1] / "models" / "checkpoints"


class ModelSettings(BaseModel):
    """Which checkpoint serves a task: a local folder or a hub id (safetensors weights only)."""

    checkpoint: str = Field(default="", description="empty: the shipped demo checkpoint of the task")
    enabled: bool = True
    method: str | None = Field(default=None, description="reduction method; default: the model family's")
    default_compression: str = Field(default="none", description="level name or FLOPs fraction in [0, 0.9]")
    export_dir: str = Field(
        default="", description="backend onnx/torchscript: folder written by `tokenlean export` for this task"
    )


class BatchingSettings(BaseModel):
    max_batch_size: int = Field(default=16, ge=1, description="items per model call")
    # 0: an idle model starts at once; batches still form from requests that arrive while a
    # batch runs. Raise it to trade latency for fuller batches under light load.
    max_wait_ms: float = Field(default=0.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(default=256, ge=1, description="waiting rows per task before 503")
    # Admission: a request is refused at once (503 + Retry-After) when the work already admitted
    # ahead of it, in predicted seconds of model time (every task: they share one model thread),
    # exceeds this. Raise it for models whose single batch takes longer.
    max_queue_wait_ms: float = Field(
        default=2000.0, gt=0, description="most predicted queueing before a request is refused"
    )
    # HTTP work (reading, validating and decoding requests, writing answers) shares the process
    # with the model: while the event loop runs this far behind, new requests are refused before
    # their body is read, so that admitted work does not delay every answer, refusals included.
    max_event_loop_lag_ms: float = Field(
        default=30.0, gt=0, description="event-loop delay beyond which new requests are refused (503)"
    )
    # A request not started this long after it arrived is answered 504 instead of run.
    deadline_ms: float = Field(
        default=10_000.0, gt=0, description="default server-side deadline; a request may set a shorter one"
    )


class LimitSettings(BaseModel):
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="per image")
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="whole request body")
    # The models see 64-224 px, so pixels beyond a camera photo only cost decoding time and
    # memory: 25 M takes a 24-megapixel photo (6000x4000); larger images are best downscaled
    # by the client.
    max_image_pixels: int = Field(default=25_000_000, ge=1, description="per image, read from its header")
    max_request_pixels: int = Field(
        default=100_000_000, ge=1, description="all images of one request, read from their headers"
    )
    decode_budget_pixels: int = Field(
        default=50_000_000,
        ge=1,
        description="pixels being decoded at once across requests; further large images wait their turn",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body not received within this is answered 408"
    )
    max_question_chars: int = Field(default=512, ge=1)
    max_candidates: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=20, ge=1)


class RaySettings(BaseModel):
    """`engine=ray`: the same app in Ray Serve replicas behind Ray's HTTP proxy (app/engines/)."""

    replicas: int = Field(default=1, ge=1, description="replicas when not autoscaling (`--replicas N`)")
    autoscaling: bool = Field(
        default=False, description="let Ray Serve scale between min_replicas and max_replicas"
    )
    min_replicas: int = Field(default=1, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int = Field(default=4, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(
        default=16.0, gt=0, description="autoscaling: requests in flight per replica it aims at"
    )
    # Ray's default (5) would keep a replica's micro-batches below 5 requests; its own admission
    # (batching.max_queue_wait_ms) still refuses work it cannot start in time.
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="requests in flight per replica; more wait in the proxy"
    )
    max_queued_requests: int = Field(
        default=256, ge=-1, description="requests waiting in a proxy for a replica before 503; -1: no bound"
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of the proxy's 503 on a full queue")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per replica (Ray sets its torch threads)")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica; a fraction shares a GPU")
    app_name: str = Field(default="tokenlean", min_length=1, description="the Serve application's name")
    metrics_export_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="local Ray instance: its Prometheus export port (every replica's metrics)",
    )
    dashboard: bool = Field(default=False, description="local Ray instance: start Ray's dashboard")

    @model_validator(mode="after")
    def _replica_bounds(self) -> RaySettings:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENLEAN_",
        env_nested_delimiter="__",
        cli_prog_name="tokenlean serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: str = Field(
        default="torch",
        description="torch (eager PyTorch), or onnx / torchscript: the exported graphs in each task's "
        "export_dir; any registered backend",
    )
    models: dict[str, ModelSettings] = Field(
        default_factory=dict,
        validate_default=True,
        description="per task: checkpoint, enabled, method, default compression",
    )
    batching: BatchingSettings = BatchingSettings()
    # Latency budgets (app/budget.py): with this set, a request sending no compression is
    # `auto` within this budget unless it sends its own `latency_budget_ms`.
    latency_budget_ms: int | None = Field(
        default=None,
        ge=1,
        le=600_000,
        description="default latency budget: requests without a compression get `auto` within it",
    )
    overload_policy: Literal["degrade", "reject"] = Field(
        default="degrade",
        description="an `auto` request no plan fits in its budget: degrade (the most compressed plan) "
        "or reject (503 + Retry-After)",
    )
    limits: LimitSettings = LimitSettings()
    api_key: str | None = Field(default=None, description="bearer token required on /v1 and /v2 routes")
    protect_metrics: bool = Field(default=False, description="require the API key on /metrics too")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    warmup: bool = True
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM: how long queued requests may take before 503"
    )
    max_connections: int = Field(
        default=1024, ge=1, description="open connections (and requests in flight); past it, requests get 503"
    )
    keep_alive_s: int = Field(default=5, ge=1, description="idle keep-alive connections close after this")
    engine: Literal["uvicorn", "ray"] = Field(
        default="uvicorn",
        description="uvicorn: this one process; ray: Ray Serve replicas behind Ray's proxy (see --ray.*)",
    )
    ray: RaySettings = RaySettings()

    @field_validator("models")
    @classmethod
    def _every_task(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        """An entry per registered task, in the registry's order; empty checkpoints are the demo ones."""
        from app.tasks.base import tasks

        known = tasks()
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks: {list(known)}")
        models = {}
        for name, task in known.items():
            cfg = value.get(name, ModelSettings())
            if not cfg.checkpoint:
                cfg = cfg.model_copy(update={"checkpoint": str(CHECKPOINTS / task.demo_checkpoint)})
            models[name] = cfg
        return models

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, value: str) -> str:
        from models.backends.base import backend_names

        if value not in backend_names():
            raise ValueError(f"unknown backend {value!r}; expected one of {list(backend_names())}")
        return value

    def enabled(self) -> dict[str, ModelSettings]:
        return {task: cfg for task, cfg in self.models.items() if cfg.enabled}

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, value: str | None) -> str | None:
        # `TOKENLEAN_API_KEY=` (a secret that failed to render) must not turn authentication off.
        if value is not None and not value.strip():
            raise ValueError("is empty: set a token, or unset TOKENLEAN_API_KEY to serve without one")
        return value

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
