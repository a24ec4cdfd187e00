"""Where the demo checkpoints live and what they are called (no torch: the CLI imports this)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

# Checkpoint folders under CHECKPOINTS (and under train-demo's --out), as the recipes produce them.
# The defaults, on the pretrained DINOv2-S and MiniLM-L6 towers (models.demo.two_stream):
VQA = "vqa"  # two-stream VQA
RETRIEVAL = "retrieval"  # two-stream image-text matching
CLASSIFY = "classify"  # DINOv2-S with a trained head
# The small models trained from scratch at 64 px, selectable by setting:
VILT_VQA = "vilt-vqa"
VILT_RETRIEVAL = "vilt-retrieval"
VIT_CLASSIFY = "vit-classify"
LOOKUPVIT_CLASSIFY = "lookupvit-classify"
DEFAULTS = (VQA, RETRIEVAL, CLASSIFY)
DEMO_CHECKPOINTS = (
    *DEFAULTS,
    VILT_VQA,
    VILT_RETRIEVAL,
    VIT_CLASSIFY,
    LOOKUPVIT_CLASSIFY,
)  # `tokenlean eval`'s order

# Not saved: the ViT classifier after its first phase, which initialises ViLT.
CLASSIFY_PHASE1 = "classify-phase1"
