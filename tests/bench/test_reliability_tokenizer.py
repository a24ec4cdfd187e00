"""The 500s the reliability benchmark's first full run saw ("Unable to create tensor ..." on a VQA
batch): the service measures a request's text on the event loop (`padded_length`: truncation, no
padding) while the model thread encodes a batch (`encode_texts`: padding to the batch's length),
and a fast tokenizer keeps its padding and truncation settings on one shared Rust object that each
call sets and then uses. Interleaved, the batch was encoded with the other call's settings (no
padding), its rows came out of unequal length, and the tensor could not be built. Without the
bundle's lock, VQA and retrieval load from bench/loadgen.py reproduced it (20 of 5,939 requests
answered 500 in 40 s); with it, none of 21,497 in 190 s.

The test makes the interleaving certain instead of likely: the first tokenizer call waits inside
until a second call enters (or a second passes). Serialised calls never overlap."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from models.bundle import load_bundle

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "vqa"
BATCH = [
    "is there a circle?",
    "what color is the shape in the image?",
    "does the image not contain a brown shape?",
]


class HoldingTokenizer:
    """Wraps a tokenizer; its first call holds until a second call has entered (at most `hold_s`)."""

    def __init__(self, inner, hold_s: float = 1.0):
        self.inner, self.hold_s = inner, hold_s
        self.first_inside, self.second_entered = threading.Event(), threading.Event()
        self._mutex = threading.Lock()
        self.calls = self.inside = self.most_inside = 0

    def __call__(self, *args, **kwargs):
        with self._mutex:
            self.calls += 1
            first = self.calls == 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if first:
                self.first_inside.set()
                self.second_entered.wait(self.hold_s)
            else:
                self.second_entered.set()
            return self.inner(*args, **kwargs)
        finally:
            with self._mutex:
                self.inside -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(CHECKPOINT)


def measure_while_a_batch_is_encoded(bundle) -> tuple[HoldingTokenizer, dict, int]:
    real = bundle.tokenizer
    probe = bundle.tokenizer = HoldingTokenizer(real)
    encoded: dict = {}
    try:
        model_thread = threading.Thread(target=lambda: encoded.update(bundle.encode_texts(BATCH, 16)))
        model_thread.start()
        assert probe.first_inside.wait(30)
        length = bundle.padded_length(["is there a circle?"])  # what the event loop does meanwhile
        model_thread.join(30)
        assert not model_thread.is_alive()
    finally:
        bundle.tokenizer = real
    return probe, encoded, length


def test_measuring_a_text_waits_for_a_batch_being_encoded(bundle):
    probe, encoded, length = measure_while_a_batch_is_encoded(bundle)
    assert probe.calls == 2 and probe.most_inside == 1
    assert tuple(encoded["input_ids"].shape) == (len(BATCH), 16)
    assert tuple(encoded["attention_mask"].shape) == (len(BATCH), 16)
    assert length == 8


def test_without_the_lock_the_calls_overlap(bundle, monkeypatch):
    """The check above can fail: unserialised, the two calls are inside the tokenizer at once."""
    monkeypatch.setattr(bundle, "_tokenizer_lock", contextlib.nullcontext())
    probe, _, _ = measure_while_a_batch_is_encoded(bundle)
    assert probe.most_inside == 2
