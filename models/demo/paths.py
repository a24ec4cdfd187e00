"""Where the demo checkpoints live and what they are called (no torch: the CLI imports this)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

# Checkpoint folders under CHECKPOINTS (and under train-demo's --out), as the recipes produce them.
# The defaults, one per task: small ViLT models trained from scratch at 64 px (models.demo.vilt),
# and the pretrained DINOv2-S/14 with a trained head (models.demo.two_stream).
VQA = "vqa"
RETRIEVAL = "retrieval"
CLASSIFY = "classify"
# Selectable by setting: the small ViT classifier (64 px) and the LookupViT trained from it.
VIT_CLASSIFY = "vit-classify"
LOOKUPVIT_CLASSIFY = "lookupvit-classify"
DEFAULTS = (VQA, RETRIEVAL, CLASSIFY)
DEMO_CHECKPOINTS = (*DEFAULTS, VIT_CLASSIFY, LOOKUPVIT_CLASSIFY)  # shipped; `tokenlean eval`'s order
# Trained by `tokenlean train-demo --only two-stream` but not shipped: the two-stream VQA and
# image-text matching models on DINOv2-S + MiniLM-L6 (docs/demo-models.md says why).
TWO_STREAM_VQA = "two-stream-vqa"
TWO_STREAM_RETRIEVAL = "two-stream-retrieval"

# Not saved: the ViT classifier after its first phase, which initialises ViLT.
CLASSIFY_PHASE1 = "classify-phase1"
