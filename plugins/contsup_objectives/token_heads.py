"""Heads on token features (N, D), a vision transformer's: the pieces the auxiliary classifiers
use to read tokens, and a head of one transformer block (``head = "block"``).

A convolutional variant lays the patch tokens back on their square grid (D, g, g)
(:class:`TokenGridMap`); one without convolutions reads the normalised class token, or the mean
token where there is none (:class:`TokenPool`), as the backbone's own head does. The prefix
tokens (class, distillation, register) are counted from the shape alone (docs/tokens.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from contsup.errors import ContsupError
from contsup.types import HeadSpec, Shape, TokenGrid, shape_kind


def prefix_tokens(shape: Shape) -> int:
    """How many prefix tokens (class, distillation, register) lead a token sequence of ``shape``
    (N, D), read as prefix + a square grid of patches (:meth:`TokenGrid.square`)."""
    return TokenGrid.square(shape).prefix


def as_map(shape: Shape) -> Shape:
    """A feature shape as the convolutions of a head see it: a map's own (C, H, W); a token
    sequence's patch tokens on their square grid, (D, g, g)."""
    if shape_kind(shape) == "map":
        return tuple(shape)
    try:
        grid = TokenGrid.square(shape)
    except ValueError:  # no grid: compared by token count alone
        return (shape[1], shape[0], 1)
    return (shape[1], grid.rows, grid.cols)


class TokenGridMap(nn.Module):
    """Patch tokens laid back on their square grid, prefix tokens left out:
    h: (B, N, D) -> (B, D, g, g) with N = prefix + g * g."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        try:
            grid = TokenGrid.square(shape)
        except ValueError as exc:
            raise ContsupError(
                f"objective.head: a convolutional head lays tokens {tuple(shape)} on a square grid of patches, and {exc}; "
                f"use a head without convolutions (\"0c2f\") or \"block\""
            ) from None
        self.prefix, self.side = grid.prefix, grid.rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        patches = h[:, self.prefix :]
        return patches.transpose(1, 2).reshape(h.shape[0], h.shape[2], self.side, self.side)


class TokenPool(nn.Module):
    """A token sequence to one vector, as a vision transformer's head reads it: the class token
    (the first) where the sequence has prefix tokens, else the mean of every token.
    h: (B, N, D) -> (B, D)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        try:
            self.first = prefix_tokens(shape) > 0
        except ValueError:  # no square grid to read prefix tokens from: every token counts alike
            self.first = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0] if self.first else h.mean(dim=1)

    def extra_repr(self) -> str:
        return "class token" if self.first else "mean token"


def token_norm(width: int) -> nn.LayerNorm:
    """The LayerNorm a token head applies before pooling, as a vision transformer's final norm."""
    return nn.LayerNorm(width, eps=1e-6)


def attention_heads(width: int) -> int:
    """Heads for a transformer block of ``width``: one per 64 channels, as timm's ViTs have them
    (ViT-S 384 -> 6, ViT-B 768 -> 12), the nearest count below that divides the width; at least one."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


class TransformerHead(nn.Module):
    """A head of one transformer block for token features (``head = "block"``): timm's ViT block
    (``attention_heads(D)`` heads, MLP 4 x D), the final LayerNorm, the class (or mean) token,
    one linear layer to ``out``. h: (B, N, D) -> (B, out)."""

    def __init__(self, spec: HeadSpec, out: int) -> None:
        super().__init__()
        if shape_kind(spec.shape) != "tokens":
            raise ContsupError(
                f"objective.head = \"block\" is a transformer block for token features (N, D); module {spec.module}'s "
                f"output is a feature map {tuple(spec.shape)}: use a variant such as \"1c2f\" for it"
            )
        from timm.models.vision_transformer import Block

        width = spec.shape[1]
        self.block = Block(width, num_heads=attention_heads(width), mlp_ratio=4.0, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
        self.norm = token_norm(width)
        self.pool = TokenPool(spec.shape)
        self.classifier = nn.Linear(width, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.norm(self.block(h))))
