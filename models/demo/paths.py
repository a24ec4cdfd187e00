"""Where the demo checkpoints live and what they are called (no torch: the CLI imports this)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

# Checkpoint folders under CHECKPOINTS (and under train-demo's --out), as the recipes produce them.
# The defaults, one per task: two-stream VQA and image-text matching (retrieval) models on the
# pretrained DINOv2-S/14 and all-MiniLM-L6-v2 towers at 224 px, and the DINOv2-S/14 tower with a
# trained head for classification (all from models.demo.two_stream).
TWO_STREAM_VQA = "two-stream-vqa"
TWO_STREAM_RETRIEVAL = "two-stream-retrieval"
CLASSIFY = "classify"
DEFAULTS = (TWO_STREAM_VQA, TWO_STREAM_RETRIEVAL, CLASSIFY)
# Selectable by setting: small ViLT models trained from scratch at 64 px (models.demo.vilt), the
# small ViT classifier (64 px) and the LookupViT trained from it.
VQA = "vqa"
RETRIEVAL = "retrieval"
VIT_CLASSIFY = "vit-classify"
LOOKUPVIT_CLASSIFY = "lookupvit-classify"
# The two-stream VQA model trained on the scenes set (`tokenlean train-demo --scenes DIR`).
TWO_STREAM_SCENES_VQA = "two-stream-scenes-vqa"
# The shipped checkpoints trained on easy-VQA, in `tokenlean eval`'s order, then every shipped one.
EASY_VQA_CHECKPOINTS = (*DEFAULTS, VQA, RETRIEVAL, VIT_CLASSIFY, LOOKUPVIT_CLASSIFY)
DEMO_CHECKPOINTS = (*EASY_VQA_CHECKPOINTS, TWO_STREAM_SCENES_VQA)

# Not saved: the ViT classifier after its first phase, which initialises ViLT.
CLASSIFY_PHASE1 = "classify-phase1"
