"""From a recipe to a :class:`GreedyNetwork`: units -> partition -> modules with adapters and heads.

Index convention: modules are numbered 1..K; ``h_0 = x``; ``h_j^c`` is the context-enriched
input of module j+1, so module l may use the input x and ``h_j^c`` for 0 <= j <= l-2.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from contsup.errors import ContsupError
from contsup.config.parts import Parts, build_parts, too_many_modules
from contsup.model.components import last_uses, make_adapter, method_part, module_components, selector_sources, training_method
from contsup.model.fitting import partition_costs
from contsup.model.recompute import Scope, recomputed
from contsup.types import Costs, DatasetInfo, HeadSpec, NetworkLayout, Shape, Source
from contsup.config.recipe import Recipe
from contsup.protocols import ContextSelector, Objective


class FinalCrossEntropy:
    """The last module's objective: the backbone's own head with plain cross-entropy."""

    name = "final"

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=1)


@attrs.frozen
class LocalLoss:
    """A module's training loss and what it predicted (None when its head does not classify)."""

    total: torch.Tensor
    local: torch.Tensor
    reconstruction: torch.Tensor | None
    prediction: torch.Tensor | None
    extra: torch.Tensor | None = None  # the method part's own loss (see contsup.protocols.Method)


class ContextModule(nn.Module):
    """Gradient-isolated module l: adapters M_{l,s}, the body F_l, the head A_l (and decoder).

    ``forward(h, context)`` computes ``F_l(h + sum_s M_{l,s}(c_s))``; the sum makes a new tensor.
    ``recompute`` (``recompute_head``) runs every adapter (the head) through
    :func:`~contsup.model.recompute.recomputed`: it keeps only its input for backward and runs
    again there, under ``recompute_scope()`` (the live memory meter counts through it).
    """

    def __init__(
        self,
        index: int,
        body: nn.Module,
        sources: Sequence[Source],
        adapters: Mapping[Source, nn.Module],
        head: nn.Module,
        objective: Objective,
        decoder: nn.Module | None = None,
        decoder_loss: Any = None,
        weights: tuple[float, float] = (0.0, 1.0),
        info: DatasetInfo | None = None,
        recompute: bool = False,
        recompute_head: bool = False,
        part: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.recompute = recompute
        self.recompute_head = recompute_head
        self.recompute_scope: Scope = contextlib.nullcontext
        self.sources = tuple(sources)
        self.adapters = nn.ModuleDict({str(s): adapters[s] for s in self.sources})
        self.body = body
        self.head = head
        self.decoder = decoder
        self.objective = objective
        self.decoder_loss = decoder_loss
        self.weights = weights  # (reconstruction, local)
        self.info = info
        self.part = part  # a training method's own part of this module (None: none)

    def enrich(self, h: torch.Tensor, context: Sequence[torch.Tensor]) -> torch.Tensor:
        """h_{l-1}^c = h_{l-1} + sum_s M_{l,s}(c_s); context is aligned with ``self.sources``."""
        for source, c in zip(self.sources, context):
            adapter = self.adapters[str(source)]
            h = h + (recomputed(adapter, adapter, c, scope=self.recompute_scope) if self.recompute else adapter(c))
        return h

    def forward(self, h: torch.Tensor, context: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        return self.body(self.enrich(h, context))

    def feature(self, out: torch.Tensor) -> torch.Tensor:
        """What the head and decoder read of the module's output h_l: h_l itself, or what a
        training method's part makes of it."""
        part = self.part
        return part.feature(out) if part is not None and hasattr(part, "feature") else out

    def head_output(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output z for the module's output h_l (what evaluation counts)."""
        return self.head(self.feature(out))

    def loss(self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> LocalLoss:
        """The module's loss on its output ``out``: local objective [+ weighted reconstruction],
        and the method part's own loss (``extra``) where it has one."""
        a = self.feature(out)
        z = recomputed(self.head, self.head, a, scope=self.recompute_scope) if self.recompute_head else self.head(a)
        local = self.objective.loss(z, y)
        w_rec, w_local = self.weights
        reconstruction = None
        total = local if w_local == 1.0 else w_local * local
        if self.decoder is not None and w_rec != 0.0:
            reconstruction = self.decoder_loss(self.decoder(a), x, self.info)
            total = total + w_rec * reconstruction
        part = self.part
        extra = part.extra_loss(out, y, x) if part is not None and hasattr(part, "extra_loss") else None
        with torch.no_grad():
            prediction = self.objective.predict(z.detach())
        return LocalLoss(total, local.detach(), None if reconstruction is None else reconstruction.detach(), prediction, extra)


class ContextStore:
    """The h_j^c that later modules use, kept (detached when training greedily) until their last use."""

    def __init__(self, x: torch.Tensor, last_use: Mapping[int, int], detach: bool) -> None:
        self.x = x
        self.last_use = last_use
        self.detach = detach
        self.kept: dict[int, torch.Tensor] = {}

    def gather(self, sources: Iterable[Source]) -> list[torch.Tensor]:
        """The tensors for ``sources``, in order."""
        return [self.x if s.is_input else self.kept[s.index] for s in sources]

    def add(self, j: int, hc: torch.Tensor) -> None:
        """Keep h_j^c if a later module uses it."""
        if j in self.last_use:
            self.kept[j] = hc.detach() if self.detach else hc

    def release(self, module: int) -> None:
        """Forget the features whose last user was ``module``."""
        for j in [j for j in self.kept if self.last_use[j] <= module]:
            del self.kept[j]

    def context_input(self, module: ContextModule, h: torch.Tensor) -> torch.Tensor:
        """h_{l-1}^c, module l's input with its context: h_{l-1} (B, C, H, W) enriched from the
        kept sources, and kept in turn when a later module uses it. The one context wiring of a
        greedy network: training, evaluation and the pipeline's stages all come through here.
        The caller releases (``release(l)``) once module l is done with its context."""
        hc = module.enrich(h, self.gather(module.sources))
        self.add(module.index - 1, hc)
        return hc

    def run(self, module: ContextModule, h: torch.Tensor) -> torch.Tensor:
        """Module l on its input h_{l-1}: its context input, then F_l; returns h_l."""
        return module.body(self.context_input(module, h))


class GreedyNetwork(nn.Module):
    """The whole network: K context modules. ``forward(x)`` returns the final logits, adapters
    included, so a trained network is used like any classifier."""

    def __init__(self, modules: Sequence[ContextModule], info: DatasetInfo | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(modules)
        self.info = info
        self.last_use = last_uses([m.sources for m in modules])
        self.store_watchers: list[Callable[[ContextStore], None]] = []  # told of every store made (memory meters)

    @property
    def num_modules(self) -> int:
        return len(self.blocks)

    def store(self, x: torch.Tensor, detach: bool) -> ContextStore:
        """A new :class:`ContextStore` for a pass over x (its tensors detached when ``detach``)."""
        store = ContextStore(x, self.last_use, detach)
        for watch in self.store_watchers:
            watch(store)
        return store

    def module_outputs(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """[h_1, ..., h_last] (default every module) for x: (B, C, H, W); later modules do not run."""
        store = self.store(x, detach=False)
        h, outs = x, []
        for m in list(self.blocks)[:last]:
            h = store.run(m, h)
            store.release(m.index)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.blocks[-1].head(self.module_outputs(x)[-1])


# -- building -----------------------------------------------------------------------------------


@attrs.frozen
class ModulePlan:
    """What one module holds: 1-based ``index``, its units, its sources and its shapes."""

    index: int
    units: int
    unit_range: tuple[int, int]  # [first, last], 0-based, inclusive
    sources: tuple[Source, ...]
    input_shape: Shape
    output_shape: Shape


def check_split(sizes: Sequence[int], n: int, k: int, who: str) -> tuple[int, ...]:
    """A partitioner's answer must be K positive counts summing to n."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != k or any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ContsupError(
            f"partitioner '{who}' returned {list(sizes)}, which is not {k} positive unit counts summing to {n}"
        )
    return sizes


def plan_modules(
    sizes: Sequence[int], shapes: Sequence[Shape], input_shape: Shape, selectors: Sequence[Any]
) -> list[ModulePlan]:
    """The module plans for a split; ``selectors[l-1]`` chooses module l's sources, given the
    split's :class:`~contsup.types.NetworkLayout` when its ``sources`` takes one."""
    k = len(sizes)
    layout = NetworkLayout.from_split(input_shape, shapes, sizes)
    plans = []
    for m in layout.modules:
        module = m.index
        sources = selector_sources(selectors[module - 1], module, k, layout)
        check_sources(sources, module, k, selectors[module - 1])
        plans.append(ModulePlan(module, m.units, m.unit_range, sources, m.input_shape, m.output_shape))
    return plans


def check_sources(sources: Sequence[Source], module: int, k: int, selector: ContextSelector) -> None:
    """A selector's answer for module l of k: Sources, each once, that the index convention allows."""
    who = getattr(selector, "name", type(selector).__name__)
    seen = set()
    for s in sources:
        if not isinstance(s, Source):
            raise ContsupError(f"context selector '{who}' returned {s!r} for module {module}; expected a contsup.types.Source")
        if s in seen:
            raise ContsupError(f"context selector '{who}' returned source {s} twice for module {module}")
        seen.add(s)
        if module == 1 or (not s.is_input and not 0 <= s.index <= module - 2):  # module 1 gets no context
            raise ContsupError(
                f"context selector '{who}' gave module {module} of {k} the source {s}; module {module} may use x and h0..h{module - 2}"
                if module >= 2
                else f"context selector '{who}' gave module 1 the source {s}; module 1 gets no context"
            )


@attrs.frozen
class Built:
    """A built network and what was learnt building it."""

    network: GreedyNetwork
    plans: list[ModulePlan]
    info: DatasetInfo
    unit_shapes: list[Shape]

    @property
    def layout(self) -> NetworkLayout:
        """The layout the selectors were given: every module's shapes, units and stage."""
        return NetworkLayout.from_split(self.info.input_shape, self.unit_shapes, [p.units for p in self.plans])


def split_parts(recipe: Recipe, costs: Costs | None) -> tuple[Parts, tuple[int, ...]]:
    """Steps 1-3 of building: the recipe's parts (:func:`contsup.config.parts.build_parts`) and
    the partitioner's split of its units."""
    parts = build_parts(recipe.backbone, recipe.dataset)
    k, n = recipe.partition.modules, len(parts.units)
    problem = too_many_modules(k, n, recipe.backbone.use)
    if problem:
        raise ContsupError(problem)
    partitioner = recipe.partitioner.create()
    if costs is None:
        costs = partition_costs(partitioner, recipe, parts.backbone, parts.unit_shapes, parts.info)
    sizes = check_split(partitioner.split(costs, k), n, k, recipe.partitioner.use)
    return parts, sizes


def network_layout(recipe: Recipe, costs: Costs | None = None) -> NetworkLayout:
    """The layout the recipe's selectors are given (every module's shapes, units and stage),
    without building modules; the caller's torch RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.run.seed)
        parts, sizes = split_parts(recipe, costs)
    return NetworkLayout.from_split(parts.input_shape, parts.unit_shapes, sizes)


def build_network(recipe: Recipe, costs: Costs | None = None) -> Built:
    """The recipe's network, freshly initialised from the current torch RNG state."""
    built_parts, sizes = split_parts(recipe, costs)
    info, parts, shapes, input_shape = built_parts.info, built_parts.backbone, built_parts.unit_shapes, built_parts.input_shape
    units = built_parts.units
    k = recipe.partition.modules
    components = module_components(recipe, k)
    method = training_method(recipe)
    plans = plan_modules(sizes, shapes, input_shape, [c.selector for c in components])
    final_shape = shapes[-1]
    modules = []
    for plan, parts_l in zip(plans, components):
        body = nn.Sequential(*units[plan.unit_range[0] : plan.unit_range[1] + 1])
        adapters = {}
        for s in plan.sources:
            source_shape = input_shape if s.is_input else plans[s.index].input_shape  # h_j^c feeds module j+1
            adapters[s] = make_adapter(parts_l.selector, s, tuple(source_shape), plan.input_shape)
        part = None
        if plan.index == k:
            head, obj, dec, dec_loss, weights = parts.head, FinalCrossEntropy(), None, None, (0.0, 1.0)
        else:
            obj = parts_l.objective
            spec = HeadSpec(
                plan.output_shape, final_shape, info.num_classes,
                module=plan.index, num_modules=k, last_unit=plan.unit_range[1], units=units, unit_shapes=shapes,
            )
            part = method_part(method, spec, obj)
            spec = attrs.evolve(spec, shape=tuple(getattr(part, "feature_shape", spec.shape)))
            head = obj.head(spec)
            decoder = parts_l.decoder
            dec = decoder.build(spec.shape, info) if decoder is not None else None
            dec_loss = decoder.loss if decoder is not None else None
            weights = tuple(float(w) for w in decoder.weights(plan.index, k)) if decoder is not None else (0.0, 1.0)
        modules.append(
            ContextModule(
                plan.index, body, plan.sources, adapters, head, obj,
                decoder=dec, decoder_loss=dec_loss, weights=weights, info=info,
                recompute=recipe.context_options.recompute, recompute_head=recipe.context_options.recompute_head,
                part=part,
            )
        )
    network = GreedyNetwork(modules, info)
    if recipe.run.init == "official":
        official_init(network)
    if method is not None and hasattr(method, "prepare"):
        method.prepare(network)
    return Built(network, plans, info, shapes)


def official_init(network: nn.Module) -> None:
    """Re-initialise as the official code does, in module order: every convolution's weight from
    normal(0, sqrt(2 / (k_h * k_w * out_channels))) (biases untouched), every batch norm to weight 1
    and bias 0. Linear layers keep theirs."""
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, (2.0 / n) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
