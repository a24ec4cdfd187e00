"""Where a method's reducers sit: layer indices chosen for a 12-layer model, placed at the same
relative depth in other depths."""

from __future__ import annotations

from models.plan import LayerSpec
from models.reduction.prune import round_half_up


def scaled_layers(layers_of_12: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Layer indices chosen for a 12-layer model, placed at the same relative depth."""
    scaled = {min(round_half_up(i * num_layers / 12), num_layers - 1) for i in layers_of_12}
    return tuple(sorted(scaled))


def at_layers(num_layers: int, layers: tuple[int, ...], spec: LayerSpec) -> tuple[LayerSpec, ...]:
    """`spec` at the given layers, identity elsewhere."""
    return tuple(spec if i in layers else LayerSpec() for i in range(num_layers))
