"""tokenlean's ML core: token reduction for Hugging Face vision and vision-language transformers.

Names are imported on first use, so `models.plan` and `models.trace` (plain values the HTTP
layer passes around) load without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NO_REDUCTION": "models.plan",
    "LayerSpec": "models.plan",
    "ReductionPlan": "models.plan",
    "Trace": "models.trace",
    "ReducedOutput": "models.families.base",
    "ReducibleModel": "models.families.base",
    "reducible": "models.families.registry",
    "named_plan": "models.levels",
    "plan_for_target": "models.levels",
    "resolve": "models.levels",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
