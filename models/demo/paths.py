"""Where the demo checkpoints live and what they are called (no torch: the CLI imports this)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

# Checkpoint folders under CHECKPOINTS (and under train-demo's --out), as the recipes produce them.
VQA = "vqa"
RETRIEVAL = "retrieval"
CLASSIFY = "classify"
CLASSIFY_LOOKUPVIT = "classify-lookupvit"
DEMO_CHECKPOINTS = (VQA, RETRIEVAL, CLASSIFY, CLASSIFY_LOOKUPVIT)  # `tokenlean eval`'s default order

# Not saved: the ViT classifier after its first phase, which initialises ViLT.
CLASSIFY_PHASE1 = "classify-phase1"
