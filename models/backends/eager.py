"""Eager PyTorch: the reduced forward itself, any plan of any method."""

from __future__ import annotations

import numpy as np
import torch

from models.backends.base import Backend, BatchOutput, register_backend
from models.plan import ReductionPlan


class EagerBackend(Backend):
    name = "torch"

    def run(self, plan: ReductionPlan, pixels: np.ndarray, texts, text_length: int) -> BatchOutput:
        device = self.bundle.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            out = self.bundle.forward(torch.from_numpy(pixels), texts, plan, text_length)
            logits = out.logits.float().cpu().numpy()
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
        return BatchOutput(logits, out.trace, peak)


register_backend(EagerBackend)
