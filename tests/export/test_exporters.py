"""Exported graphs (ONNX Runtime and TorchScript) against the eager reduced model, the manifest's
integrity checks, and the service on a graph backend, all on the shipped demo checkpoints."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest import loaded_status, png_bytes, wait_ready
from fastapi.testclient import TestClient

from app.cli import main as cli_main
from app.main import create_app
from app.settings import Settings
from exporters.export import export_task
from exporters.manifest import ManifestError, file_sha256, load_manifest, weights_sha256
from exporters.runtime import GraphSet, check_compatible, onnx_providers
from models import named_plan
from models.bundle import load_bundle
from models.plan import LEVELS

CHECKPOINTS = Path(__file__).resolve().parents[2] / "models" / "checkpoints"
FORMATS = ("onnx", "torchscript")
# Questions of several lengths, so every batch of more than one has padded rows.
QUESTIONS = [
    "what shape is this?",
    "is there a blue triangle in the image or not?",
    "what color?",
    "does the image not contain a red circle?",
]
CAPTIONS = ["a red circle", "a blue rectangle shape", "gray", "a triangle"]
# The small 64 px checkpoints: every level of every task exports in seconds. The two-stream
# defaults' export is tested on tiny random models in tests/models/test_two_stream_export.py.
FOLDERS = {"classify": "vit-classify", "vqa": "vqa", "retrieval": "retrieval"}
# Retrieval captions are short: one question length is enough there.
LENGTHS = {"classify": None, "vqa": None, "retrieval": [8]}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    with torch.inference_mode(False):
        for task in ("classify", "vqa", "retrieval"):
            for fmt in FORMATS:
                folder = root / f"{task}-{fmt}"
                export_task(
                    task, CHECKPOINTS / FOLDERS[task], folder, fmt, lengths=LENGTHS[task], progress=False
                )
                folders[task, fmt] = folder
    return folders


@pytest.fixture(scope="module")
def pipelines():
    return {task: load_bundle(CHECKPOINTS / FOLDERS[task]) for task in ("classify", "vqa", "retrieval")}


def eager_and_graph(pipeline, graphs: GraphSet, level: str, length: int, batch: int):
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    plan = named_plan(pipeline.model, level)
    if not pipeline.model.takes_text:
        return pipeline.model(pixels, plan=plan).logits, graphs.run(level, 0, pixels)
    texts = (QUESTIONS if pipeline.model.head == "classifier" else CAPTIONS)[:batch]
    eager = pipeline.forward(pixels, texts, plan, length).logits
    enc = pipeline.encode_texts(texts, length)
    if batch > 1:
        assert not bool(enc["attention_mask"].all()), "the batch must contain padded questions"
    return eager, graphs.run(level, length, enc["input_ids"], enc["attention_mask"], pixels)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", ["classify", "vqa", "retrieval"])
def test_graphs_equal_the_eager_reduced_model(exports, pipelines, task, fmt):
    graphs = GraphSet(exports[task, fmt], fmt)
    assert graphs.levels() == list(LEVELS)
    checked = 0
    for entry in graphs.manifest.graphs:
        for batch in (1, 4):
            eager, exported = eager_and_graph(pipelines[task], graphs, entry.level, entry.text_length, batch)
            assert exported.shape == eager.shape
            err = (exported - eager).abs().max().item()
            assert err <= 1e-4, f"{task} {fmt} {entry.level} text {entry.text_length} batch {batch}: {err}"
            checked += 1
    assert checked == 2 * len(LEVELS) * len(graphs.manifest.text_lengths())


def test_reduced_graphs_really_reduce(exports, pipelines):
    manifest = load_manifest(exports["vqa", "onnx"])
    for entry in manifest.graphs:
        plan = named_plan(pipelines["vqa"].model, entry.level)
        assert entry.plan == plan.to_dict()
        if entry.level == "none":
            assert entry.flops_saved == 0 and len(set(entry.tokens_per_layer)) == 1
        else:
            assert entry.flops < entry.full_flops and entry.tokens_per_layer[-1] < entry.tokens_per_layer[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_is_complete_and_hashes_match(exports, pipelines, fmt):
    for task in ("classify", "vqa", "retrieval"):
        folder = exports[task, fmt]
        manifest = load_manifest(folder)
        model = pipelines[task].model
        assert manifest.task == task and manifest.format == fmt
        assert manifest.weights_sha256 == weights_sha256(model.model)
        assert manifest.labels == pipelines[task].labels()
        assert manifest.preprocessing.image_size == 64
        assert (manifest.opset is not None) == (fmt == "onnx")
        expected_lengths = [0] if task == "classify" else (LENGTHS[task] or [8, 16])
        assert manifest.text_lengths() == expected_lengths
        assert len(manifest.graphs) == len(LEVELS) * len(expected_lengths)
        for g in manifest.graphs:
            assert file_sha256(folder / g.file) == g.sha256
            assert g.flops == model.flops(
                named_plan(model, g.level), g.text_length, model.nominal_tokens()[1]
            )
            names = [t.name for t in g.inputs]
            assert names == (
                ["pixel_values"] if task == "classify" else ["input_ids", "attention_mask", "pixel_values"]
            )
            assert all(t.shape[0] == "batch" for t in g.inputs + g.outputs)
            if fmt == "onnx":
                graph = onnx.load(str(folder / g.file)).graph
                assert [i.name for i in graph.input] == names
                assert [o.name for o in graph.output] == ["logits"]
                assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
        if task != "classify":
            assert (folder / manifest.preprocessing.tokenizer / "tokenizer.json").is_file()


def copy_export(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_tampered_or_missing_graph_is_refused(exports, tmp_path):
    folder = copy_export(exports["classify", "onnx"], tmp_path)
    target = folder / "classify-medium.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="classify-medium.onnx: sha256 .* does not match"):
        GraphSet(folder, "onnx")
    target.unlink()
    with pytest.raises(ManifestError, match="classify-medium.onnx: listed in the manifest but missing"):
        GraphSet(folder, "onnx")


def test_bad_manifests_are_refused(exports, tmp_path):
    folder = copy_export(exports["classify", "torchscript"], tmp_path)
    with pytest.raises(ManifestError, match="holds torchscript graphs, but the backend is onnx"):
        GraphSet(folder, "onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"][0]["file"] = "../outside.pt"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="must stay inside the folder"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not a valid tokenlean manifest"):
        load_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(folder)


def test_graphs_from_other_weights_or_task_are_refused(exports, pipelines):
    manifest = load_manifest(exports["classify", "onnx"])
    other = load_bundle(CHECKPOINTS / FOLDERS["classify"]).model
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    with pytest.raises(ManifestError, match="other weights"):
        check_compatible(manifest, "classify", other)
    with pytest.raises(ManifestError, match="holds classify graphs, not vqa"):
        check_compatible(manifest, "vqa", pipelines["vqa"].model)


def test_onnx_runtime_uses_cuda_only_when_there_is_one():
    cuda_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda", cuda_build) == cuda_build
    assert onnx_providers("cuda:1", cuda_build) == cuda_build
    assert onnx_providers("cpu", cuda_build) == ["CPUExecutionProvider"]
    assert onnx_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_export_command_writes_a_loadable_folder(tmp_path, capsys):
    with torch.inference_mode(False):
        cli_main(
            ["export", "--task", "vqa", "--model", str(CHECKPOINTS / FOLDERS["vqa"]), "--levels", "none,high"]
            + ["--format", "torchscript", "--text-lengths", "16", "--out", str(tmp_path)]
        )
    assert "vqa-high-t16.pt" in capsys.readouterr().out
    graphs = GraphSet(tmp_path, "torchscript")
    assert graphs.levels() == ["none", "high"] and graphs.manifest.text_lengths() == [16]
    assert graphs.text_length_for(3) == 16 and graphs.text_length_for(40) == 16


# ---------------------------------------------------------------- the service on a graph backend


def service_client(backend: str, exports=None) -> TestClient:
    models = {}
    for task in ("classify", "vqa", "retrieval"):
        models[task] = {"checkpoint": str(CHECKPOINTS / FOLDERS[task])}
        if exports:
            models[task]["export_dir"] = str(exports[task, backend])
    settings = Settings(backend=backend, models=models, warmup=True)
    return TestClient(create_app(settings))


def png(color) -> str:
    return base64.b64encode(png_bytes(color)).decode()


REQUESTS = [
    ("/v1/vqa", {"image": png((255, 0, 0)), "question": "what color is the shape?", "compression": "medium"}),
    (
        "/v1/vqa",
        {
            "image": png((0, 0, 255)),
            "question": "is there not a blue rectangle in this image?",
            "compression": "high",
        },
    ),
    ("/v1/classify", {"image": png((0, 128, 0)), "compression": "low", "top_k": 3}),
    ("/v1/retrieval", {"image": png((255, 0, 0)), "texts": CAPTIONS, "compression": "none"}),
]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_service_on_a_graph_backend_answers_as_torch_does(exports, backend):
    with service_client("torch") as eager, service_client(backend, exports) as graph:
        wait_ready(eager)
        wait_ready(graph)
        models = {m["task"]: m for m in graph.get("/v1/models").json()["models"]}
        assert all(m["backend"] == backend for m in models.values())
        for path, body in REQUESTS:
            a, b = eager.post(path, json=body), graph.post(path, json=body)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            a, b = a.json(), b.json()
            assert a["compression"] == b["compression"] and a["tokens"] == b["tokens"]
            assert a["flops"] == b["flops"]
            key = {"/v1/vqa": "answers", "/v1/classify": "labels", "/v1/retrieval": "ranking"}[path]
            assert [r.get("label", r.get("index")) for r in a[key]] == [
                r.get("label", r.get("index")) for r in b[key]
            ]
            for ra, rb in zip(a[key], b[key], strict=True):
                assert abs(ra["score"] - rb["score"]) <= 1e-4

        # A numeric target runs at the closest exported level, and the response says which.
        r = graph.post("/v1/classify", json={"image": png((0, 128, 0)), "compression": 0.32})
        assert r.status_code == 200, r.text
        assert r.json()["compression"]["requested"] == 0.32 and r.json()["compression"]["level"] == "medium"
        # Only the exported method can run.
        r = graph.post(
            "/v1/classify", json={"image": png((0, 128, 0)), "compression": "low", "method": "evit"}
        )
        assert r.status_code == 422 and "exported with tome only" in r.json()["error"]["message"]


def test_graph_backend_without_an_export_folder_fails_loudly():
    with service_client("onnx") as client:
        assert loaded_status(client) == "failed"
        assert client.post("/v1/classify", json={"image": png((0, 0, 0))}).status_code == 503


@pytest.mark.parametrize("fmt", FORMATS)
def test_lookupvit_levels_export_too(tmp_path, fmt):
    checkpoint = CHECKPOINTS / "lookupvit-classify"
    with torch.inference_mode(False):
        export_task("classify", checkpoint, tmp_path, fmt, levels=("none", "high"), progress=False)
    graphs = GraphSet(tmp_path, fmt)
    pipeline = load_bundle(checkpoint)
    check_compatible(graphs.manifest, "classify", pipeline.model)
    assert [g.plan.get("grid") for g in graphs.manifest.graphs] == [None, 1]
    for level in ("none", "high"):
        for batch in (1, 4):
            eager, exported = eager_and_graph(pipeline, graphs, level, 0, batch)
            assert (exported - eager).abs().max().item() <= 1e-4
