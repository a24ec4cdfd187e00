"""LookupViT configuration: plain data, saved as config.json with the checkpoint."""

from __future__ import annotations

from transformers import PretrainedConfig


class LookupViTConfig(PretrainedConfig):
    """A ViT-shaped LookupViT (Koner et al., ECCV 2024).

    The patch grid (image_size / patch_size per side) gives the N lookup tokens; a compressed grid
    of g x g tokens (M = g^2) is chosen per call. `grid_sizes` are the sides the model was trained
    with (sampled per step); `default_grid` is the one a call without a grid uses, the model's
    highest-fidelity setting (the largest trained grid).

    intermediate_size: MLP width of the ViT block on the compressed tokens (p = 4 -> 4 D).
    lookup_intermediate_size: MLP width on the lookup tokens (D / q, q = 2 -> D / 2).
    """

    model_type = "lookupvit"

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    lookup_intermediate_size: int = 64
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    qkv_bias: bool = True
    grid_sizes: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    default_grid: int | None = None

    def __post_init__(self, **kwargs):
        self.grid_sizes = sorted({int(g) for g in self.grid_sizes})
        if self.default_grid is None:
            self.default_grid = max(self.grid_sizes)
        super().__post_init__(**kwargs)
        side = self.lookup_grid
        if not self.grid_sizes or not all(1 <= g <= side for g in self.grid_sizes):
            raise ValueError(f"grid_sizes must lie in [1, {side}], got {self.grid_sizes}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def lookup_grid(self) -> int:
        """Side of the patch grid: the lookup tokens."""
        return self.image_size // self.patch_size
