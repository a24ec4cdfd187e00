"""Between protocol tensors and a task (app/tasks/): an infer request's inputs and parameters become
the task's /v1 request body and raw image bytes, and the task's response fields and the /v1 report
become output tensors and response parameters. Generic over tasks: each describes its tensors
(`Task.v2_inputs`, `v2_outputs`, `v2_tensors`)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from app.errors import BadInput, InvalidInput
from app.images import decode_base64
from app.tasks.base import Task, TensorSpec
from app.v2.codec import BINARY_OUTPUT, InferRequest, Tensor


def metadata(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


# /v1 only: a token map (a patch grid) is no tensor of a task's v2 model.
V1_ONLY = ("return_token_map", "token_map_layer")


def parameter_names(task: Task) -> list[str]:
    """The request fields that come as parameters: every field that is not an input tensor (nor
    /v1 only)."""
    inputs = {spec.name for spec in task.v2_inputs}
    return [name for name in task.request.model_fields if name not in inputs and name not in V1_ONLY]


def request_body(task: Task, request: InferRequest, max_upload_bytes: int) -> tuple[BaseModel, dict]:
    """The task's request body (image fields hold placeholders, as a multipart upload's do) and
    the raw bytes of each image input."""
    specs = {spec.name: spec for spec in task.v2_inputs}
    unknown = sorted(set(request.inputs) - set(specs))
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}; model {task.name} takes {list(specs)}")
    _check_outputs(task, request)
    payload: dict[str, Any] = {}
    images: dict[str, list[bytes]] = {}
    for spec in task.v2_inputs:
        tensor = request.inputs.get(spec.name)
        if tensor is None:
            if not spec.optional:
                raise InvalidInput(f"input {spec.name!r} is required")
            continue
        _check_tensor(tensor, spec)
        if spec.name in task.file_fields:
            images[spec.name] = [_image(v, max_upload_bytes) for v in tensor.data]
            values: list = [""] * len(tensor.data)
        else:
            values = [_text(v, spec.name) for v in tensor.data]
        payload[spec.name] = values if spec.name in task.list_fields else values[0]
    allowed = parameter_names(task)
    for key, value in request.parameters.items():
        if key == BINARY_OUTPUT:
            continue
        if key not in allowed:
            raise InvalidInput(
                f"unknown parameter {key!r}; model {task.name} takes {[*allowed, BINARY_OUTPUT]}"
            )
        payload[key] = value
    try:
        return task.request.model_validate(payload), images
    except ValidationError as exc:
        raise InvalidInput(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc


def _check_outputs(task: Task, request: InferRequest) -> None:
    names = [spec.name for spec in task.v2_outputs]
    unknown = sorted(set(request.outputs or ()) - set(names))
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; model {task.name} returns {names}")


def _check_tensor(tensor: Tensor, spec: TensorSpec) -> None:
    if tensor.datatype != spec.datatype:
        raise BadInput(f"input {spec.name!r}: datatype {tensor.datatype}, expected {spec.datatype}")
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(s not in (-1, d) for s, d in zip(spec.shape, shape, strict=True)):
        raise BadInput(
            f"input {spec.name!r}: shape {list(shape)}, expected {list(spec.shape)} (-1: any length)"
        )


def _image(value: bytes | str, max_bytes: int) -> bytes:
    """Binary data holds the image file itself; JSON, a string, holds it in base64 (or a
    data:image/...;base64, URL), as /v1's JSON does. Nothing else is read: no path, no URL."""
    return value if isinstance(value, bytes) else decode_base64(value, max_bytes)


def _text(value: bytes | str, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"input {name!r}: not UTF-8 text") from exc


def output_tensors(task: Task, fields: dict, request: InferRequest) -> list[tuple[Tensor, bool]]:
    """The outputs asked for (all when none were), each with whether it goes back binary."""
    values = task.v2_tensors(fields)
    wanted = request.outputs if request.outputs is not None else {s.name: None for s in task.v2_outputs}
    specs = {spec.name: spec for spec in task.v2_outputs}
    return [
        (Tensor(name, specs[name].datatype, (len(values[name]),), values[name]), request.binary(name))
        for name in wanted
        if name in values
    ]


def response_parameters(report: dict) -> dict[str, str | int | float | bool]:
    """The /v1 report as protocol parameters, whose values are strings, numbers or booleans:
    sections flattened to `<section>_<field>` (`compression_level`, `flops_saved`,
    `timings_total_ms` ...), lists and the plan as JSON strings (`tokens_per_layer`,
    `compression_plan`), absent values left out."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in report.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for field, v in items:
            if v is None:
                continue
            name = key if field is None else f"{key}_{field}"
            out[name] = json.dumps(v, separators=(",", ":")) if isinstance(v, dict | list) else v
    return out
