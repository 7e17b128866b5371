"""Built-in context selectors: none/R0, E, Rn, RnE, MiRnE, all, and ``contsup`` with options;
``stage``, which reads the network's layout.

For module l (1-based) the sources are the raw input x (through M_E) and features h_j^c with
0 <= j <= l-2 (through M_R); module 1 gets none. The names are shorthands for the options of
the ``contsup`` selector: ``M1R1E`` is ``input = true, recent = 1, intermediate = 1``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

import attrs

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.types import NetworkLayout, Shape, Source

if TYPE_CHECKING:  # annotations only: the adapters (and torch) load when the first one is built
    from torch import nn

_ADAPTERS = (
    "FastInputEncoder", "InputEncoder", "OfficialShortcutAdapter", "ShortcutAdapter",
    "TokenEncoder", "TokenShortcut", "OfficialTokenShortcut", "IdentityShortcut",
)

_SHORTCUT_DOC = (
    'M_R: "official" = 1x1 conv + BN + ReLU + pool (the official code); "paper" = 1x1 conv + pool (the paper\'s '
    'text); "identity" = the source as it is where its shape is h\'s, else "paper". Token modules (N, D): a '
    'linear map per token, with LayerNorm + GELU for "official" (docs/tokens.md)'
)
_ENCODER_TOKENS = " Token modules (N, D) get a patch embedding at the backbone's patch size whatever the variant (docs/tokens.md)"

_NAME = re.compile(r"^(?:M(?P<m>[1-9]\d*))?(?:R(?P<r>0|[1-9]\d*))?(?P<e>E)?$")


def _scale(_instance: Any, _attribute: Any, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value!r}")


_scale.describe = "in (0, 1]"  # type: ignore[attr-defined]

START_DOC = (
    "each context adapter's last layer (its last batch norm's weight; the paper's M_R: its 1x1 convolution) "
    "starts at this fraction of PyTorch's initialisation, so that context begins as a small addition to the "
    "module's input and grows as it is learned; 1: PyTorch's initialisation as it is; run.init = \"official\" "
    "re-initialises the adapters as the official code does, whatever this says (docs/recipes.md, Defaults and why)"
)


def contsup_sources(
    module: int, *, input: bool, recent: int, intermediate: int, dense: bool, input_once: bool = False
) -> tuple[Source, ...]:
    """The sources of 1-based ``module`` for the given options, input first then by index.

    ``input_once`` (with ``input``) leaves out h_0^c, which is x itself, so x reaches a module
    once, through M_E: the official code's module 2 under RnE gets x only."""
    if module <= 1:
        return ()
    chosen: set[Source] = set()
    if input:
        chosen.add(Source.input())
    last = module - 2  # the newest feature module l may use is h_{l-2}^c
    if dense:
        chosen.update(Source.feature(j) for j in range(last + 1))
    for i in range(1, recent + 1):
        j = module - 1 - i
        if j >= 0:
            chosen.add(Source.feature(j))
    for k in range(1, intermediate + 1):
        chosen.add(Source.feature((k * last) // (intermediate + 1)))
    if input and input_once:
        chosen.discard(Source.feature(0))
    return tuple(sorted(chosen, key=Source.sort_key))


class ContSup:
    """Context supply: the input (E), the n most recent features (Rn), i evenly spaced
    intermediate features (Mi), or every feature (dense), each through its own adapter."""

    name = "contsup"
    examples = ("none", "R0", "E", "R1", "R1E", "R2E", "M1R1E", "M2R1E", "R8E", "all")

    @attrs.frozen
    class Options:
        input: bool = option(False, doc="E: add the raw input x through the input encoder M_E")
        recent: int = option(0, doc="Rn: add h_{l-1-i}^c for i = 1..n (those that exist)", validator=at_least(0))
        intermediate: int = option(
            0, doc="Mi: add h_j^c for j = floor(k(l-2)/(i+1)), k = 1..i", validator=at_least(0)
        )
        dense: bool = option(False, doc="add every h_j^c with j <= l-2 (with input = true: the 'all' selector)")
        encoder: Literal["paper", "official", "pooled", "fast"] = option(
            "official",
            doc='M_E: "official" = two 3x3 conv+BN+ReLU at x\'s size, first width 12, then pool (the official code, '
            'which produced the published numbers); "paper" = the same with first width h\'s channels (Table 7; trains '
            'unstably without warm-up, docs/experiments.md); "pooled" = pool x to h\'s size first, then the paper\'s '
            'layers; "fast" = pool first, then one 3x3 conv+BN+ReLU (docs/performance.md).' + _ENCODER_TOKENS,
        )
        shortcut: Literal["paper", "official", "identity"] = option(
            "official", doc=_SHORTCUT_DOC,
        )
        input_once: bool = option(
            False, doc="with input = true, leave out h_0^c (which is x itself) as a feature source, so x reaches each "
            "module once, through M_E: module 2 of RnE gets x only, as in the official code (preset = \"official\")",
        )
        start: float = option(0.1, doc=START_DOC, validator=_scale)

    @classmethod
    def resolve_name(cls, name: str) -> dict | None:
        """Options preset by a shorthand name (``none``, ``all``, ``E``, ``R1E``, ``M2R1E``, ...)."""
        base = {"input": False, "recent": 0, "intermediate": 0, "dense": False}
        if name == "none":
            return base
        if name == "all":
            return {**base, "input": True, "dense": True}
        match = _NAME.match(name)
        if not name or match is None:
            return None
        return {
            **base,
            "input": match["e"] is not None,
            "recent": int(match["r"] or 0),
            "intermediate": int(match["m"] or 0),
        }

    def __init__(self, options: "ContSup.Options") -> None:
        self.options = options

    def sources(self, module: int, num_modules: int) -> tuple[Source, ...]:
        o = self.options
        return contsup_sources(
            module, input=o.input, recent=o.recent, intermediate=o.intermediate, dense=o.dense, input_once=o.input_once
        )

    def adapter(self, source: Source, source_shape: Shape, target_shape: Shape) -> nn.Module:
        """M_E for the input, M_R for a feature, in the variant the options choose."""
        o = self.options
        return build_adapter(o.encoder, o.shortcut, source, source_shape, target_shape, start=o.start)


def build_adapter(
    encoder: str, shortcut: str, source: Source, source_shape: Shape, target_shape: Shape, start: float = 1.0
) -> nn.Module:
    """M_E (variant ``encoder``) for the input, M_R (variant ``shortcut``) for a feature, its last
    layer scaled by ``start`` (:func:`start_small`); for a token module (N, D), the token
    adapters (``contsup.adapters.token_adapter``), as PyTorch initialises them."""
    from contsup_context.adapters import (
        OFFICIAL_ENCODER_WIDTH, FastInputEncoder, IdentityShortcut, InputEncoder, OfficialShortcutAdapter, ShortcutAdapter,
        involves_tokens, token_adapter,
    )

    if involves_tokens(source_shape, target_shape):
        return token_adapter(source_shape, target_shape, shortcut)
    if source.is_input:
        if encoder == "fast":
            adapter = FastInputEncoder(source_shape, target_shape)
        else:
            hidden = OFFICIAL_ENCODER_WIDTH if encoder == "official" else None
            adapter = InputEncoder(source_shape, target_shape, hidden=hidden, pool_first=encoder == "pooled")
    elif shortcut == "identity" and tuple(source_shape) == tuple(target_shape):
        return IdentityShortcut()
    elif shortcut == "official":
        adapter = OfficialShortcutAdapter(source_shape, target_shape)
    else:
        adapter = ShortcutAdapter(source_shape, target_shape)
    return start_small(adapter, start)


def start_small(adapter: nn.Module, scale: float) -> nn.Module:
    """``adapter`` with the weight of its last convolution or batch norm (in module order)
    multiplied by ``scale``: its output starts at about ``scale`` times PyTorch's, so the context
    it adds to a module's input starts small. Every adapter here ends in a batch norm (and a
    ReLU, which is why it is scaled, not zeroed: a zero batch-norm weight before a ReLU passes no
    gradient) or, the paper's M_R, in its 1x1 convolution."""
    import torch
    from torch import nn

    if scale != 1.0:
        last = [m for m in adapter.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
        with torch.no_grad():
            last.weight.mul_(scale)
    return adapter


def stage_sources(module: int, layout: NetworkLayout, *, input: bool = True) -> tuple[Source, ...]:
    """Sources of 1-based ``module``: x (if ``input``) and h_j^c for the first module j+1 whose
    input has module l's input shape, when j+1 < l (the entry of module l's resolution stage)."""
    if module <= 1:
        return ()
    shape = layout.module(module).input_shape
    entry = next(m.index for m in layout.modules if m.input_shape == shape)
    chosen = [Source.input()] if input else []
    if entry < module:
        chosen.append(Source.feature(entry - 1))  # h_{entry-1}^c is the entry module's input
    return tuple(chosen)


class StageSelector:
    """Module l gets x and h_j^c, the input of the first module j+1 whose input has module l's
    shape (C, H, W), when j+1 < l: the entry of l's resolution stage (a module opening a stage
    gets x only). It reads the network's layout; on ResNet-32 with K = 16: module 2 x, 3-7 x and
    h1, 8 x, 9-12 x and h7, 13 x, 14-16 x and h12.

    Each source goes through M_E or M_R in the variants ``encoder`` and ``shortcut`` choose, as
    for the ``contsup`` selector.
    """

    name = "stage"

    @attrs.frozen
    class Options:
        input: bool = option(True, doc="also add the raw input x through the input encoder M_E")
        encoder: Literal["paper", "official", "pooled", "fast"] = option(
            "official", doc='M_E variant, as for the contsup selector (see its encoder option)'
        )
        shortcut: Literal["paper", "official", "identity"] = option("official", doc=_SHORTCUT_DOC)
        start: float = option(0.1, doc="as for the contsup selector (see its start option)", validator=_scale)

    def __init__(self, options: "StageSelector.Options") -> None:
        self.options = options

    def sources(self, module: int, num_modules: int, layout: NetworkLayout) -> tuple[Source, ...]:
        return stage_sources(module, layout, input=self.options.input)

    def adapter(self, source: Source, source_shape: Shape, target_shape: Shape) -> nn.Module:
        """M_E for the input, M_R for the stage entry's input, in the variants the options choose."""
        o = self.options
        return build_adapter(o.encoder, o.shortcut, source, source_shape, target_shape, start=o.start)


@hookimpl
def register_context_selectors(register):
    register(ContSup)
    register(StageSelector)


def __getattr__(name: str) -> Any:
    """The adapter classes (``from contsup_context import InputEncoder``), which live in
    ``contsup_context.adapters``, imported on first use (they need torch)."""
    if name in _ADAPTERS:
        from contsup_context import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
