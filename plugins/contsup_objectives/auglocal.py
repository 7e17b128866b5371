"""AugLocal auxiliary networks (Ma et al., ICLR 2024): module l's head is built from the
backbone's own later units, uniformly sampled, then pooled and classified.

The rules (docs/objectives.md, "AugLocal"):

- depth: module l of K (l < K) gets ``d_l = max(1, round(d - (d - 1) * pyramid * (l - 1) / (K - 2)))``
  units, so with ``pyramid = 1`` the depth falls linearly from ``d`` at module 1 to 1 at module
  K - 1; ``pyramid = 0`` keeps ``d`` everywhere (K = 2: one local module, depth d);
- sampling: with the module's last unit j and n units in all, the ``n - 1 - j`` later units; all
  of them when ``d_l`` reaches that count, else units ``round(j + (n - 1 - j) * i / d_l)`` for
  i = 1..d_l, which always ends at the backbone's last unit.

Each sampled unit is a ``copy.deepcopy`` of the backbone's unit with every parameter and buffer
reinitialised (``reset_parameters`` of each submodule), so it has the unit's type and shapes but
weights of its own. Where a sampled unit takes a shape other than the one reaching it (the sample
skipped a change of resolution or width), the paper's M_R (a 1x1 convolution after adaptive
average pooling) bridges the two.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from contsup.adapters import ShortcutAdapter
from contsup.layers import fresh_copy
from contsup.errors import ContsupError
from contsup.types import HeadSpec, Shape


def auglocal_depth(depth: int, pyramid: float, module: int, num_modules: int) -> int:
    """The number of later units in module ``module``'s head (1 <= module < num_modules)."""
    local = num_modules - 1
    if local <= 1:
        return depth
    ratio = pyramid * (module - 1) / (local - 1)
    return max(1, round(depth * (1 - ratio) + ratio))


def sample_units(last_unit: int, num_units: int, depth: int) -> list[int]:
    """The later units (0-based) a head of ``depth`` copies, for a module ending at ``last_unit``."""
    later = num_units - 1 - last_unit
    if later < 1:
        raise ValueError(f"a module ending at unit {last_unit} of {num_units} has no later units")
    if depth >= later:
        return list(range(last_unit + 1, num_units))
    return [round(last_unit + later * i / depth) for i in range(1, depth + 1)]


class AugLocalHead(nn.Module):
    """Copies of sampled later units (bridged where shapes differ), global average pool, one
    linear layer to ``out``. h: (B, C, H, W) -> (B, out). ``sampled`` names the units copied."""

    plan_key = "auglocal"  # what contsup plan lists it under (the objectives' plan_keys)

    def __init__(self, spec: HeadSpec, out: int, depth: int, pyramid: float) -> None:
        super().__init__()
        if spec.last_unit is None or not spec.units or spec.module < 1:
            raise ContsupError(
                "objective.head = \"auglocal\" builds its head from the backbone's later units, but this "
                "head was asked for without them; use a head variant such as \"1c2f\" here"
            )
        self.depth = auglocal_depth(depth, pyramid, spec.module, spec.num_modules)
        self.sampled = tuple(sample_units(spec.last_unit, len(spec.units), self.depth))
        layers: list[nn.Module] = []
        shape: Shape = tuple(spec.shape)
        for u in self.sampled:
            wanted = tuple(spec.unit_input_shape(u))
            if wanted != shape:
                layers.append(ShortcutAdapter(shape, wanted))
            layers.append(fresh_copy(spec.units[u]))
            shape = tuple(spec.unit_shapes[u])
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(shape[0], out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(h)))

    def plan_detail(self, unit_shapes: Sequence[Shape]) -> dict:
        """What contsup plan says of the head: its depth and the units it copies, with their shapes."""
        shapes = [list(unit_shapes[u]) for u in self.sampled]
        copied = ", ".join(f"{u} ({'x'.join(map(str, s))})" for u, s in zip(self.sampled, shapes))
        return {
            "depth": int(self.depth), "units": [int(u) for u in self.sampled], "unit_shapes": shapes,
            "title": "fresh copies (own weights, reinitialised) of later backbone units, then pool + linear",
            "columns": {"depth": int(self.depth), "copies of units (output shape)": copied},
        }


def copied_units(head: AugLocalHead) -> Sequence[nn.Module]:
    """The head's copies of backbone units, in order (its bridges left out)."""
    return [m for m in head.features if not isinstance(m, ShortcutAdapter)]
