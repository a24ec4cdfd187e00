"""Settings: one entry per registered task, from variables and from `tokenlean serve` flags; values
that would silently weaken the service are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.cli import fold_model_flags
from app.metrics import LATENCY_BUCKETS
from app.settings import CHECKPOINTS, Settings


def test_every_task_has_settings_and_unnamed_ones_keep_the_demo_checkpoint(monkeypatch):
    monkeypatch.setenv("TOKENLEAN_MODELS__VQA__CHECKPOINT", "some/hub-id")
    monkeypatch.setenv("TOKENLEAN_MODELS__CLASSIFY__ENABLED", "false")
    settings = Settings()
    assert list(settings.models) == ["vqa", "retrieval", "classify"]
    assert settings.models["vqa"].checkpoint == "some/hub-id"
    assert settings.models["retrieval"].checkpoint == str(CHECKPOINTS / "two-stream-retrieval")
    assert list(settings.enabled()) == ["vqa", "retrieval"]


def test_serve_flags_set_per_task_fields():
    argv = ["--port", "9", "--models.vqa.checkpoint", "x", "--models.classify.enabled=false"]
    settings = Settings(_cli_parse_args=fold_model_flags([*argv, "--models.vqa.default-compression", "low"]))
    assert settings.port == 9 and settings.models["vqa"].checkpoint == "x"
    assert settings.models["vqa"].default_compression == "low" and not settings.models["classify"].enabled
    assert fold_model_flags(["--port", "9"]) == ["--port", "9"]


def test_unknown_tasks_and_backends_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        Settings(models={"captioning": {}})
    with pytest.raises(ValueError, match="unknown backend"):
        Settings(backend="tensorrt")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_api_key_refuses_to_start_instead_of_disabling_auth(monkeypatch, value):
    monkeypatch.setenv("TOKENLEAN_API_KEY", value)
    with pytest.raises(ValueError, match="api_key"):
        Settings()
    monkeypatch.delenv("TOKENLEAN_API_KEY")
    assert Settings().api_key is None  # unset: no auth, as documented


def test_serve_with_an_empty_api_key_exits_with_the_reason():
    env = {**os.environ, "TOKENLEAN_API_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "api_key" in result.stderr and "Traceback" not in result.stderr


def test_the_top_finite_latency_bucket_is_30_seconds():
    assert LATENCY_BUCKETS[-1] == 30.0
    assert LATENCY_BUCKETS[0] <= 0.0005
