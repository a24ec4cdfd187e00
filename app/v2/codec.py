"""The Open Inference Protocol v2 (the KServe / Triton "v2" REST protocol) on the wire: an infer
request's JSON and the binary tensor data after it in, a response's JSON and binary data out.

Binary tensor data (the extension tritonclient uses by default): the body is the JSON header
followed by the tensors' bytes, `Inference-Header-Content-Length` giving the header's size; an
input's `parameters.binary_data_size` is its share of the bytes, in input order. A BYTES element
is a 4-byte little-endian length followed by that many bytes; fixed-size types are packed little
endian, row-major. Outputs are sent binary when asked (`binary_data` on a requested output, else
the request's `binary_data_output`), with `binary_data_size` in their parameters.

Plain bytes, lists and numbers: no model, no task, no HTTP framework. Input that cannot be read
is a BadInput (400, app/errors.py); a tensor over the element limit, an InvalidInput (422)."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from app.errors import BadInput, InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_OUTPUT = "binary_data_output"  # the request parameter: every output binary
# Element formats of the fixed-size datatypes (struct, little endian); BF16 is the high half of an
# FP32, sent as its 16 bits.
FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
    "BF16": "H",
}
DATATYPES = (*FORMATS, "BYTES")
_LENGTH = struct.Struct("<I")
_DIGITS = re.compile(r"[0-9]{1,15}")
MAX_NAME = 64  # characters of a tensor's name (error messages quote names)


@dataclass(frozen=True)
class Tensor:
    """A tensor's elements, flat in row-major order: BYTES elements are `bytes` when they came as
    binary data and `str` when they came in JSON; other types are numbers."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    # the outputs asked for, by name, with their `binary_data` (None: not said); None: every output
    outputs: dict[str, bool | None] | None

    def binary(self, output: str) -> bool:
        """Whether this output goes back as binary data."""
        said = self.outputs.get(output) if self.outputs is not None else None
        return said if said is not None else self.parameters.get(BINARY_OUTPUT, False)


# ------------------------------------------------------------------ requests


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a request body."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not _DIGITS.fullmatch(text):
        raise BadInput(f"{HEADER_LENGTH} must be the JSON header's size in bytes, got {text[:40]!r}")
    size = int(text)
    if size > len(body):
        raise BadInput(f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes")
    return body[:size], body[size:]


def decode_request(
    body: bytes, header_length: str | None = None, max_elements: int | None = None
) -> InferRequest:
    """An infer request's body (and its Inference-Header-Content-Length) -> its tensors. A tensor
    whose shape holds more than `max_elements` is refused before its data is read (InvalidInput)."""
    header, binary = split_body(body, header_length)
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        raise BadInput(f"the inference header is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(payload, dict):
        raise BadInput("the inference header must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput("id must be a string")
    parameters = _parameters(payload.get("parameters"), "the request")
    if not isinstance(parameters.get(BINARY_OUTPUT, False), bool):
        raise BadInput(f"parameter {BINARY_OUTPUT} must be true or false")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadInput("inputs must be a non-empty list of tensors")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for raw in raw_inputs:
        tensor, offset = _input(raw, binary, offset, max_elements)
        if tensor.name in inputs:
            raise BadInput(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data follow the last binary input")
    return InferRequest(request_id, parameters, inputs, _outputs(payload.get("outputs")))


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"parameters of {where} must be a JSON object")
    return value


def _name(raw: dict, what: str) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise BadInput(f"every {what} needs a name, a string of 1 to {MAX_NAME} characters")
    return name


def _input(raw: Any, binary: bytes, offset: int, max_elements: int | None) -> tuple[Tensor, int]:
    """One input tensor, reading its binary data (if any) at `offset`; returns the next offset."""
    if not isinstance(raw, dict):
        raise BadInput("every input must be a JSON object")
    name = _name(raw, "input")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise BadInput(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidInput(f"input {name!r}: {count} elements; at most {max_elements} per tensor")
    parameters = _parameters(raw.get("parameters"), f"input {name!r}")
    if "shared_memory_region" in parameters:
        raise BadInput(f"input {name!r}: shared memory is not supported; send the data in the request")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise BadInput(f"input {name!r} has neither data nor binary_data_size")
        data = _flat(raw["data"], name, count)
        _check_json_elements(data, datatype, name)
    else:
        if "data" in raw:
            raise BadInput(f"input {name!r} has both data and binary_data_size")
        if type(size) is not int or size < 0:
            raise BadInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise BadInput(
                f"input {name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes of binary data left)"
            )
        data = _unpack(binary[offset : offset + size], datatype, count, name)
        offset += size
    if len(data) != count:
        found = f"more than {count}" if len(data) > count else str(len(data))
        raise BadInput(f"input {name!r}: shape {shape} holds {count} elements, the data {found}")
    return Tensor(name, datatype, tuple(shape), data), offset


def _flat(data: Any, name: str, count: int) -> list:
    """JSON tensor data, flat or nested row-major lists, as one flat list (read no further than
    one element past `count`: the caller refuses the mismatch)."""
    if not isinstance(data, list):
        raise BadInput(f"input {name!r}: data must be a list")
    out: list = []
    stack = [iter(data)]
    while stack and len(out) <= count:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > count:
                break
        else:
            stack.pop()
    return out


def _check_json_elements(data: list, datatype: str, name: str) -> None:
    if datatype == "BYTES":
        ok = all(isinstance(v, str) for v in data)
        expected = "strings"
    elif datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in data)
        expected = "true or false"
    elif datatype.startswith("FP") or datatype == "BF16":
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in data)
        expected = "numbers"
    else:
        ok = all(type(v) is int for v in data)
        expected = "integers"
    if not ok:
        raise BadInput(f"input {name!r}: the elements of a {datatype} tensor must be {expected}")


def _unpack(raw: bytes, datatype: str, count: int, name: str) -> list:
    if datatype == "BYTES":
        return unpack_bytes(raw, name, count)
    fmt = FORMATS[datatype]
    itemsize = struct.calcsize(fmt)
    if len(raw) != count * itemsize:
        raise BadInput(
            f"input {name!r}: {count} {datatype} elements take {count * itemsize} bytes, "
            f"binary_data_size is {len(raw)}"
        )
    values = list(struct.unpack(f"<{count}{fmt}", raw))
    if datatype == "BF16":
        values = [struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in values]
    return values


def unpack_bytes(raw: bytes, name: str = "tensor", count: int | None = None) -> list[bytes]:
    """A BYTES tensor's binary data: each element a 4-byte little-endian length, then its bytes
    (read no further than one element past `count`: the caller refuses the mismatch)."""
    out, pos, end = [], 0, len(raw)
    while pos < end and (count is None or len(out) <= count):
        if pos + 4 > end:
            raise BadInput(f"input {name!r}: element {len(out)} has a truncated length prefix")
        (length,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + length > end:
            raise BadInput(
                f"input {name!r}: element {len(out)} announces {length} bytes, {end - pos} are left"
            )
        out.append(raw[pos : pos + length])
        pos += length
    return out


def _outputs(value: Any) -> dict[str, bool | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadInput("outputs must be a list")
    outputs: dict[str, bool | None] = {}
    for raw in value:
        if not isinstance(raw, dict):
            raise BadInput("every requested output must be a JSON object")
        name = _name(raw, "requested output")
        if name in outputs:
            raise BadInput(f"output {name!r} is requested twice")
        parameters = _parameters(raw.get("parameters"), f"output {name!r}")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in parameters:
                raise BadInput(f"output {name!r}: {unsupported} is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadInput(f"output {name!r}: binary_data must be true or false")
        outputs[name] = binary
    return outputs


# ------------------------------------------------------------------ responses


def pack(tensor: Tensor) -> bytes:
    """A tensor's binary data."""
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.data:
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    if tensor.datatype == "BF16":
        raise ValueError("BF16 outputs are not supported")
    return struct.pack(f"<{len(tensor.data)}{FORMATS[tensor.datatype]}", *tensor.data)


def encode_response(
    model_name: str,
    request_id: str | None,
    outputs: list[tuple[Tensor, bool]],
    parameters: dict[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an infer response; `outputs` are (tensor, as binary data)."""
    described, blobs = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary:
            blob = pack(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data
        described.append(entry)
    payload: dict[str, Any] = {"model_name": model_name}
    if request_id is not None:
        payload["id"] = request_id
    payload |= {"parameters": parameters, "outputs": described}
    # ASCII escapes: a client's id may hold a lone surrogate, which UTF-8 cannot encode
    header = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    if not any(binary for _, binary in outputs):
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
