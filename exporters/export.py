"""`tokenlean export`: one ONNX or TorchScript graph per compression level (and, for ViLT, per
question length), plus manifest.json and the tokenizer the graphs expect."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from exporters.formats import DEFAULT_OPSET, FORMATS
from exporters.manifest import (
    GraphEntry,
    Manifest,
    Preprocessing,
    TensorSpec,
    file_sha256,
    weights_sha256,
)
from models.bundle import load_bundle
from models.levels import named_plan
from models.plan import LEVELS, NO_REDUCTION

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TRACE_BATCH = 2  # any batch > 1 keeps the batch axis from being specialised to 1
OUTPUTS = ("logits",)


def export_onnx(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"inputs": tuple({0: batch} for _ in graph.input_names)}  # PlanGraph.forward(*inputs)
    # The exporter reports every step on stdout; keep the progress bar readable.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            example,
            input_names=list(graph.input_names),
            output_names=list(OUTPUTS),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def export_torchscript(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    # Tracer warnings about Python ints are expected (token counts are static), and TorchScript's
    # deprecation notice is known: libtorch deployments still load these files.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(path))


def tensor_specs(names, tensors) -> list[TensorSpec]:
    return [
        TensorSpec(name=n, dtype=str(t.dtype).removeprefix("torch."), shape=["batch", *t.shape[1:]])
        for n, t in zip(names, tensors, strict=True)
    ]


def export_task(
    task: str,
    model: str,
    out: str | Path,
    fmt: str = "onnx",
    levels: tuple[str, ...] = LEVELS,
    method: str | None = None,
    lengths: list[int] | None = None,
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
) -> Manifest:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(model)
    rm = bundle.model
    method = method or rm.default_method
    lengths = lengths or rm.family.export_text_lengths(rm)
    n_image = rm.nominal_tokens()[1]

    entries = []
    jobs = [(level, length) for level in levels for length in lengths]
    bar = tqdm(jobs, desc=f"export {task} ({fmt})", disable=not progress)
    with torch.inference_mode(False), torch.no_grad():
        for level, length in bar:
            bar.set_postfix(level=level, text=length)
            plan = named_plan(rm, level, method)
            graph = rm.family.graph(rm, plan)
            example = tuple(rm.family.example_inputs(rm, TRACE_BATCH, length).values())
            logits = graph(*example)  # eager: the output's dtype and shape for the manifest
            name = f"{task}-{level}" + (f"-t{length}" if length else "") + SUFFIX[fmt]
            path = out / name
            if fmt == "onnx":
                export_onnx(graph, example, path, opset)
            else:
                export_torchscript(graph, example, path)
            counts = rm.schedule(plan, length, n_image)
            flops, full = rm.flops(plan, length, n_image), rm.flops(NO_REDUCTION, length, n_image)
            entries.append(
                GraphEntry(
                    level=level,
                    text_length=length,
                    file=name,
                    sha256=file_sha256(path),
                    plan=plan.to_dict(),
                    flops=flops,
                    full_flops=full,
                    flops_saved=round(1 - flops / full, 4),
                    tokens_per_layer=[t + i for t, i in counts],
                    inputs=tensor_specs(rm.input_names, example),
                    outputs=tensor_specs(OUTPUTS, (logits,)),
                )
            )

    tokenizer = None
    if bundle.tokenizer is not None:
        tokenizer = "tokenizer"
        shutil.rmtree(out / tokenizer, ignore_errors=True)
        bundle.tokenizer.save_pretrained(out / tokenizer)
    pre = bundle.preprocess
    manifest = Manifest(
        task=task,
        model=str(model),
        architecture=type(rm.model).__name__,
        family=rm.family.name,
        method=method,
        weights_sha256=weights_sha256(rm.model),
        format=fmt,
        opset=opset if fmt == "onnx" else None,
        torch_version=torch.__version__,
        labels=bundle.labels(),
        preprocessing=Preprocessing(
            image_size=pre.size,
            mean=list(pre.mean),
            std=list(pre.std),
            tokenizer=tokenizer,
            text_padding="right, to the graph's text_length; attention_mask 1 for real tokens"
            if tokenizer
            else None,
        ),
        graphs=entries,
    )
    manifest.write(out)
    return manifest
