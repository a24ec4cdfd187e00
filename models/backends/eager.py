"""Eager PyTorch: the reduced forward itself, any plan of any method."""

from __future__ import annotations

import numpy as np
import torch

from models.backends.base import Backend, BatchOutput, register_backend
from models.plan import ReductionPlan


class EagerBackend(Backend):
    name = "torch"
    token_maps = True

    def run(
        self,
        plan: ReductionPlan,
        pixels: np.ndarray,
        texts,
        text_length: int,
        token_map_layer: int | None = None,
    ) -> BatchOutput:
        device = self.bundle.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        mapped = token_map_layer is not None
        maps = None
        with torch.inference_mode():
            out = self.bundle.forward(torch.from_numpy(pixels), texts, plan, text_length, mapped)
            logits = out.logits.float().cpu().numpy()
            if mapped:
                maps = tuple(self.bundle.model.token_maps(out, token_map_layer))
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
        return BatchOutput(logits, out.trace, peak, maps)


register_backend(EagerBackend)
