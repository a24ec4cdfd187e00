"""The recipes of docs/architecture.md, done as a contributor would: a reduction method, a backend
and a task, each one new module's worth of code registered in the test, then used through the
HTTP API without touching anything else."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient
from pydantic import Field

from app.main import create_app
from app.schemas import IMAGE_DOC, PNG_EXAMPLE, Report, TaskRequest
from app.settings import Settings
from app.tasks.base import Task, register_task, softmax, unregister_task, warmup_pixels
from models.backends.base import get_backend, register_backend, unregister_backend
from models.backends.eager import EagerBackend
from models.plan import LayerSpec, ReductionPlan
from models.reduction.methods.common import every_layer
from models.reduction.registry import IMAGE, ReductionMethod, register_method, unregister_method

B64 = base64.b64encode(png_bytes()).decode()
ONLY_CLASSIFY = {"vqa": {"enabled": False}, "retrieval": {"enabled": False}}


class DropLast(ReductionMethod):
    """A toy method: drop the last r unprotected tokens in every layer."""

    name = "droplast"
    layout = IMAGE
    summary = "drop the last r tokens (a test's toy method)"
    R = {"low": 2, "medium": 4, "high": 6}

    def level_plan(self, model, level):
        return ReductionPlan(
            method=self.name, level=level, layers=every_layer(model, LayerSpec(r=self.R[level]))
        )

    def candidates(self, model):
        return [ReductionPlan(method=self.name, layers=every_layer(model, LayerSpec(r=r))) for r in range(8)]

    def count(self, spec, n_text, n_image, model):
        return n_text, max(model.protected, n_image - spec.r)

    def reduce(self, spec, tokens, attn, plan, model):
        keep = max(model.protected, tokens.n_image - spec.r)
        source = tokens.source[:, :keep] if tokens.source is not None else None
        return tokens.reduced(x=tokens.x[:, :keep], size=tokens.size[:, :keep], source=source)


class CountingBackend(EagerBackend):
    """A toy backend: eager PyTorch that counts its calls."""

    name = "counting"
    calls = 0

    def run(self, plan, pixels, texts, text_length):
        CountingBackend.calls += 1
        return super().run(plan, pixels, texts, text_length)


class BrightnessRequest(TaskRequest):
    image: str = Field(description=IMAGE_DOC)


class BrightnessResponse(Report):
    label: str
    confidence: float


class Brightness(Task):
    """A toy task: the classifier's best label plus its probability, under another route."""

    name = "brightness"
    summary = "A test's toy task."
    request = BrightnessRequest
    response = BrightnessResponse
    file_fields = ("image",)
    json_example = {"image": PNG_EXAMPLE}
    form_fields = {}
    demo_checkpoint = "classify"

    def serves(self, model):
        return not model.takes_text and model.head == "classifier"

    async def decode(self, body, images, ctx):
        return (await ctx.pixels(images["image"]))[0]

    def run(self, model, items):
        probs = softmax(model.forward(np.stack(items), None, 0))
        return [(model.labels[int(p.argmax())], float(p.max())) for p in probs]

    def encode(self, body, result):
        return {"label": result[0], "confidence": result[1]}

    def warmup_items(self, ctx, count):
        return warmup_pixels(ctx, count)


@pytest.fixture
def toy_method():
    register_method(DropLast())
    yield DropLast.name
    unregister_method(DropLast.name, IMAGE)


@pytest.fixture
def toy_backend():
    register_backend(CountingBackend)
    yield CountingBackend.name
    unregister_backend(CountingBackend.name)


@pytest.fixture
def toy_task():
    register_task(Brightness())
    yield Brightness.name
    unregister_task(Brightness.name)


def test_a_registered_method_is_served_listed_and_documented(toy_method):
    with TestClient(create_app(Settings(models=ONLY_CLASSIFY))) as client:
        wait_ready(client)
        r = client.post("/v1/classify", json={"image": B64, "method": toy_method, "compression": "medium"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["compression"]["method"] == toy_method
        per_layer = body["tokens"]["per_layer"]  # the input, then after each layer
        assert per_layer[-1] == per_layer[0] - 4 * (len(per_layer) - 1)  # r = 4 per layer
        assert body["flops"]["saved"] > 0
        numeric = client.post("/v1/classify", json={"image": B64, "method": toy_method, "compression": 0.3})
        assert numeric.status_code == 200 and numeric.json()["compression"]["method"] == toy_method
        [model] = client.get("/v1/models").json()["models"]
        assert toy_method in model["methods"]
        schema = client.get("/openapi.json").json()
        assert toy_method in str(schema["paths"]["/v1/classify"]["post"]["requestBody"])
    # and it is exact where it removes nothing, as every method must be
    from models.bundle import load_bundle
    from models.levels import plan_for_target

    rm = load_bundle(Settings().models["classify"].checkpoint).model
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    identity = ReductionPlan(method=toy_method, layers=every_layer(rm, LayerSpec(r=0)))
    assert torch.equal(rm(pixels, plan=identity).logits, rm(pixels).logits)
    assert plan_for_target(rm, 0.0, toy_method).removes_nothing


def test_a_method_is_refused_where_its_layout_does_not_apply(toy_method):
    with TestClient(
        create_app(Settings(models={"classify": {"enabled": False}, "retrieval": {"enabled": False}}))
    ) as c:
        wait_ready(c)
        r = c.post("/v1/vqa", json={"image": B64, "question": "what shape?", "method": toy_method})
        assert r.status_code == 422 and "pumer" in r.json()["error"]["message"]


def test_a_registered_backend_is_selectable(toy_backend):
    assert get_backend(toy_backend) is CountingBackend
    before = CountingBackend.calls
    with TestClient(create_app(Settings(backend=toy_backend, models=ONLY_CLASSIFY))) as client:
        wait_ready(client)
        r = client.post("/v1/classify", json={"image": B64, "compression": "high"})
        assert r.status_code == 200, r.text
        [model] = client.get("/v1/models").json()["models"]
        assert model["backend"] == toy_backend
    assert CountingBackend.calls > before
    with pytest.raises(ValueError, match="unknown backend"):
        Settings(backend="no-such-backend")


def test_a_registered_task_gets_its_route_settings_and_metrics(toy_task):
    settings = Settings(models={**ONLY_CLASSIFY, "classify": {"enabled": False}})
    assert set(settings.models) == {"vqa", "retrieval", "classify", toy_task}
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post(
            f"/v1/{toy_task}", files={"image": ("a.png", png_bytes())}, data={"compression": "low"}
        )
        assert r.status_code == 200, r.text
        assert 0 < r.json()["confidence"] <= 1 and r.json()["compression"]["level"] == "low"
        assert client.post("/v1/classify", json={"image": B64}).status_code == 404
        method = r.json()["compression"]["method"]
        assert (
            f'tokenlean_requests_total{{level="low",method="{method}",status="200",task="{toy_task}"}}'
            in client.get("/metrics").text
        )
        assert f"/v1/{toy_task}" in client.get("/openapi.json").json()["paths"]
