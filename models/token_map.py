"""Token maps: which input patches each token of one layer stands for, as plain values (numpy, no
torch), drawn from the source tracking of a reduced forward.

A family's forward with `track_source=True` fills `ReducedOutput.patch_sources` (for every layer,
entering it and then after the last, which input patches each token covers) and `patch_grid` (the
patch grid's rows and columns); `ReducibleModel.token_maps` turns one layer of that into a TokenMap
per row. How a family's tokens map to patches is its own: ViT-like towers drop their protected
tokens' columns, ViLT keeps its image tokens' rows and image patches' columns, LookupViT assigns
each patch to the compressed token whose cell of the compressed grid holds the patch's centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRUNED = -1  # a patch no token of the layer covers


@dataclass(frozen=True)
class TokenMap:
    """layer: index into the trace's per-layer counts (tokens entering that layer; the last is
    after the last layer). grid: (rows, columns) of input patches. token_of_patch: for each patch
    in raster order, the token covering it, numbered 0 .. tokens - 1 in the order of the layer's
    token sequence (tokens covering no patch, such as [CLS] or text, are not numbered), or PRUNED.
    """

    layer: int
    grid: tuple[int, int]
    token_of_patch: np.ndarray  # (rows * columns,) int
    tokens: int

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "grid": list(self.grid),
            "tokens": self.tokens,
            "token_of_patch": self.token_of_patch.tolist(),
        }


def token_maps(sources: np.ndarray, grid: tuple[int, int], layer: int) -> list[TokenMap]:
    """sources (B, N, P): how much of each of the P = rows * columns input patches each of the
    layer's N tokens covers (1 or 0 under merging, pruning and fusing). Each patch goes to the
    token covering most of it; a patch no token covers is PRUNED."""
    rows, cols = grid
    if sources.shape[-1] != rows * cols:
        raise ValueError(f"{sources.shape[-1]} patch columns for a {rows} x {cols} grid")
    maps = []
    for row in sources:
        covered = row.sum(axis=0) > 0.5
        owner = row.argmax(axis=0)
        used, numbered = np.unique(owner[covered], return_inverse=True)
        patch_tokens = np.full(rows * cols, PRUNED, dtype=np.int64)
        patch_tokens[covered] = numbered
        maps.append(TokenMap(layer, (rows, cols), patch_tokens, len(used)))
    return maps
