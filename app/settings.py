"""Service settings: environment variables (TOKENLEAN_...) and `tokenlean serve` flags.

Nested fields use `__` in environment variables and `.` on the command line, e.g.
TOKENLEAN_MODELS__VQA__CHECKPOINT=dandelin/vilt-b32-finetuned-vqa or
`tokenlean serve --models.vqa.checkpoint dandelin/vilt-b32-finetuned-vqa`.
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
    method: str | None = Field(
        default=None, description="reduction method; default: pumer (ViLT), tome (ViT)"
    )
    default_compression: str = Field(default="none", description="level name or FLOPs fraction in [0, 0.9]")
    export_dir: str = Field(
        default="", description="backend onnx/torchscript: folder written by `tokenlean export` for this task"
    )


class ModelsSettings(BaseModel):
    vqa: ModelSettings = ModelSettings()
    retrieval: ModelSettings = ModelSettings()
    classify: ModelSettings = ModelSettings()

    @model_validator(mode="after")
    def _shipped_defaults(self) -> ModelsSettings:
        for task in ("vqa", "retrieval", "classify"):
            cfg = getattr(self, task)
            if not cfg.checkpoint:
                cfg.checkpoint = str(CHECKPOINTS / task)
        return self

    def enabled(self) -> dict[str, ModelSettings]:
        return {
            task: m
            for task, m in (("vqa", self.vqa), ("retrieval", self.retrieval), ("classify", self.classify))
            if m.enabled
        }


class BatchingSettings(BaseModel):
    max_batch_size: int = Field(default=16, ge=1, description="items per model call")
    # 0: an idle model starts at once; batches still form from requests that arrive while a
    # batch runs. Raise it to trade latency for fuller batches under light load.
    max_wait_ms: float = Field(default=0.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(default=256, ge=1, description="waiting items per task before 503")


class LimitSettings(BaseModel):
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="per image")
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="whole request body")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="per image, read from its header")
    max_request_pixels: int = Field(default=80_000_000, ge=1, description="all images of one request")
    max_question_chars: int = Field(default=512, ge=1)
    max_candidates: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=20, ge=1)


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
    backend: Literal["torch", "torchscript", "onnx"] = Field(
        default="torch", description="eager PyTorch, or the exported graphs in each task's export_dir"
    )
    models: ModelsSettings = ModelsSettings()
    batching: BatchingSettings = BatchingSettings()
    limits: LimitSettings = LimitSettings()
    api_key: str | None = Field(default=None, description="bearer token required on /v1 routes")
    protect_metrics: bool = Field(default=False, description="require the API key on /metrics too")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    warmup: bool = True
    shutdown_timeout_s: float = Field(default=30.0, ge=0)

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
