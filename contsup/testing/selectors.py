"""``check_selector`` and ``check_adapter``: a context selector (and the adapters it builds)
against the engine's contract, every problem one line naming the module and K."""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from contsup.model.components import make_adapter, selector_sources, takes_layout
from contsup.model.network import ContextModule, FinalCrossEntropy, GreedyNetwork
from contsup.testing.report import Problems, graph_leaves, instance, who
from contsup.types import NetworkLayout, Shape, Source


# Representative (input shape, [module input shapes h, ...]) of the networks contsup trains.
SHAPE_PROFILES: dict[str, tuple[Shape, list[Shape]]] = {
    "CIFAR ResNet, 32x32": ((3, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "CIFAR ResNet on digits, 16x16": ((1, 16, 16), [(16, 16, 16), (32, 8, 8), (64, 4, 4)]),
    "CIFAR ResNet on STL-10, 96x96": ((3, 96, 96), [(16, 96, 96), (32, 48, 48), (64, 24, 24)]),
    "ImageNet ResNet, wide channels, 8x8": ((3, 8, 8), [(64, 4, 4), (128, 2, 2), (256, 1, 1)]),
    "odd sizes, 28x28": ((3, 28, 28), [(8, 14, 14), (16, 7, 7), (32, 4, 4)]),
}
BATCH = 2



# -- the selector checker ----------------------------------------------------------------------


def _who(selector: Any) -> str:
    return who("context selector", selector)


def check_selector(
    selector: Any, *, max_modules: int = 32, profiles: dict | None = None, layouts: Sequence[NetworkLayout] = ()
) -> None:
    """Check a context selector (a class, built with default options, or an instance).

    For every 1 <= l <= K <= ``max_modules``: sources are Sources, in range (module 1 none,
    else x and h_j^c with 0 <= j <= l-2), none twice, the same on every call; every adapter
    gives h's shape, leaves its input as it was and keeps no reference to it; module l's loss,
    built as the engine builds it, reaches only module l's parameters.

    A selector whose ``sources`` takes the layout is given, for each K, that of K one-unit
    modules over a small three-stage network (``chain_layout(K)``); ``layouts`` (for example
    ``network_layout(recipe)``) adds the source checks on those networks too.
    """
    selector = instance(selector)
    problems = Problems(_who(selector))
    if not isinstance(getattr(selector, "name", None), str):
        problems.add("'name' must be a string: the name recipes use in [context] use = ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
            torch.manual_seed(0)
            _check(selector, max_modules, SHAPE_PROFILES if profiles is None else profiles, problems, tuple(layouts))
    finally:
        torch.set_num_threads(threads)
    problems.raise_if_any()


def _check(selector: Any, max_modules: int, profiles: dict, problems: Problems, layouts: tuple = ()) -> None:
    """Sources first; adapters on the representative shapes; then, if all is well, the engine."""
    ok = _check_sources(selector, max_modules, problems, layouts)
    kinds = _source_kinds(selector, max_modules) if ok else {True, False}
    for label, (input_shape, stages) in profiles.items():
        for source, source_shape, target_shape in _profile_cases(input_shape, stages):
            if source.is_input not in kinds:
                continue  # a selector that never chooses the input (or no feature) needs no adapter for it
            found = Problems("")
            check_adapter(selector, source, source_shape, target_shape, problems=found, where=label)
            if found.count:  # the first failing shape of each kind says enough
                problems.add(found.lines()[0])
                kinds = kinds - {source.is_input}
    if ok and problems.count == 0:  # the engine check needs sources and adapters that work
        for k in range(1, max_modules + 1):
            _check_engine(selector, k, problems)
            if problems.count:
                break  # the smallest K that fails shows the problem


def _source_kinds(selector: Any, max_modules: int) -> set[bool]:
    """Which kinds of source the selector ever chooses: True for the input, False for features."""
    return {
        s.is_input
        for k in range(1, max_modules + 1)
        for module in range(1, k + 1)
        for s in selector_sources(selector, module, k, chain_layout(k))
    }


def _allowed(module: int) -> str:
    if module == 1:
        return "module 1 gets no context"
    return f"module {module} may use x and h0" + (f"..h{module - 2}" if module > 2 else "")


def chain_layout(k: int) -> NetworkLayout:
    """The layout ``check_selector`` gives a layout-aware selector for K modules: K one-unit
    modules of a small chain of convolutions from 3x12x12, in three stages (4x12x12, 8x6x6,
    16x3x3, a third of the units each)."""
    if k not in _CHAIN_LAYOUTS:
        shapes = [tuple(unit[1]) for unit in _chain_units(k)]
        _CHAIN_LAYOUTS[k] = NetworkLayout.from_split(CHAIN_INPUT, shapes, (1,) * k)
    return _CHAIN_LAYOUTS[k]


_CHAIN_LAYOUTS: dict[int, NetworkLayout] = {}


def _check_sources(selector: Any, max_modules: int, problems: Problems, layouts: tuple = ()) -> bool:
    """The index convention for every 1 <= l <= K <= max_modules (and for every module of each
    of ``layouts``); False if any is broken."""
    before = problems.count
    cases = [(k, chain_layout(k) if takes_layout(selector) else None) for k in range(1, max_modules + 1)]
    cases += [(layout.num_modules, layout) for layout in layouts]
    for k, layout in cases:
        for module in range(1, k + 1):
            try:
                sources = selector_sources(selector, module, k, layout)
                again = selector_sources(selector, module, k, layout)
            except Exception as exc:  # reported, not raised: show every problem at once
                problems.add(f"sources({module}, K) raised {type(exc).__name__}: {exc}", module, k)
                continue
            if sources != again:
                problems.add(
                    f"sources gave {_names(sources)} then {_names(again)}; it must give the same every time "
                    f"(contsup rebuilds the network from the recipe to load a trained model)", module, k,
                )
            seen: set[Source] = set()
            for s in sources:
                if not isinstance(s, Source):
                    problems.add(
                        f"sources returned {s!r} ({type(s).__name__}); expected a contsup.types.Source "
                        f"(Source.input() or Source.feature(j))", module, k,
                    )
                    continue
                if s in seen:
                    problems.add(f"sources returned {s} twice; each source at most once", module, k)
                seen.add(s)
                if module == 1 or (not s.is_input and not 0 <= s.index <= module - 2):
                    problems.add(f"sources returned {s}; {_allowed(module)}", module, k)
    return problems.count == before


def _names(sources: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in sources) + ")"


def _profile_cases(input_shape: Shape, stages: Sequence[Shape]) -> Iterator[tuple[Source, Shape, Shape]]:
    """The input to every stage, and h_j (j-th shape, x's for j = 0) to every stage not before it."""
    feature_shapes = [tuple(input_shape), *map(tuple, stages)]
    for b, target in enumerate(stages):
        yield Source.input(), tuple(input_shape), tuple(target)
        # h_j^c has feature_shapes[j]; j = b+1 is the target's own shape (modules within a stage)
        for j in range(b + 2):
            yield Source.feature(j), feature_shapes[j], tuple(target)


def check_adapter(
    selector: Any,
    source: Source,
    source_shape: Shape,
    target_shape: Shape,
    *,
    problems: Problems | None = None,
    where: str = "",
) -> None:
    """Check the adapter the engine would build for ``source`` (the selector's own, else the
    paper's): output (B, *target_shape), input left unchanged, no reference kept to it."""
    own = problems is None
    problems = problems or Problems(_who(instance(selector)))
    selector = instance(selector)
    at = f"{where + ': ' if where else ''}adapter for {source} from {_shape(source_shape)} to {_shape(target_shape)}"
    try:
        adapter = make_adapter(selector, source, tuple(source_shape), tuple(target_shape))
    except Exception as exc:
        problems.add(f"{at}: adapter(...) raised {type(exc).__name__}: {exc}")
        return
    if not isinstance(adapter, nn.Module):
        problems.add(f"{at}: adapter(...) returned {type(adapter).__name__}; expected an nn.Module or None")
        return
    for train in (True, False):
        adapter.train(train)
        mode = "train" if train else "eval"
        error = _run_adapter(adapter, source_shape, target_shape)
        if error:
            problems.add(f"{at} ({mode} mode): {error}")
            break
    if own:
        problems.raise_if_any()


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _run_adapter(adapter: nn.Module, source_shape: Shape, target_shape: Shape) -> str:
    """One forward and backward on a fresh input; '' when all is well, else what went wrong."""

    def run() -> tuple[str, weakref.ref]:
        c = torch.randn(BATCH, *source_shape)
        kept = c.clone()
        try:
            out = adapter(c)
        except Exception as exc:
            return f"forward raised {type(exc).__name__}: {exc}", weakref.ref(c)
        if not isinstance(out, torch.Tensor):
            return f"forward returned {type(out).__name__}; expected a tensor", weakref.ref(c)
        expected = (BATCH, *target_shape)
        if tuple(out.shape) != expected:
            return f"returned shape {tuple(out.shape)}; expected {expected} (h's shape)", weakref.ref(c)
        if not out.dtype.is_floating_point or not torch.isfinite(out).all():
            return "returned non-finite or non-float values", weakref.ref(c)
        if out.requires_grad:
            out.float().square().mean().backward()
        if not torch.equal(c, kept):
            return (
                "changed its input in place; the same context tensor feeds other modules, so compute "
                "out of place (no x.relu_(), no nn.ReLU(inplace=True) as the first layer)"
            ), weakref.ref(c)
        return "", weakref.ref(c)

    error, ref = run()
    adapter.zero_grad(set_to_none=True)
    if ref() is not None:
        gc.collect()  # only when needed: a reference cycle frees late, yet it does free
    if not error and ref() is not None:
        error = (
            "keeps a reference to its input (or to a result computed from it) after forward; context "
            "would stay in memory across modules and steps"
        )
    return error


# -- the engine check: one greedy step on a small chain of convolutions --------------------------


CHAIN_INPUT: Shape = (3, 12, 12)


def _chain_units(n: int) -> list[tuple[int, Shape, int]]:
    """(input channels, output shape, stride) of the ``n`` units of the chain below."""
    out = []
    channels, size = CHAIN_INPUT[0], CHAIN_INPUT[1]
    for i in range(n):
        stage = min(2, 3 * i // n)
        out_channels, stride = (4, 8, 16)[stage], 1
        if i > 0 and stage != min(2, 3 * (i - 1) // n):
            stride = 2
        size = (size + 1) // 2 if stride == 2 else size
        out.append((channels, (out_channels, size, size), stride))
        channels = out_channels
    return out


def _chain(n: int) -> tuple[Shape, list[nn.Module], list[Shape]]:
    """``n`` small conv units from 3x12x12: a third at 4x12x12, a third at 8x6x6, the rest at 16x3x3."""
    units, shapes = [], []
    for channels, shape, stride in _chain_units(n):
        units.append(nn.Sequential(nn.Conv2d(channels, shape[0], 3, stride=stride, padding=1), nn.ReLU()))
        shapes.append(shape)
    return CHAIN_INPUT, units, shapes


def _part(name: str) -> str:
    """'blocks.1.adapters.h0.conv.weight' -> 'the adapter for h0'; else the parameter's name."""
    parts = name.split(".")
    if len(parts) > 3 and parts[2] == "adapters":
        return f"the adapter for {parts[3]}"
    return f"parameter {'.'.join(parts[2:])}"


def _check_engine(selector: Any, k: int, problems: Problems) -> None:
    """Build K one-unit modules with the selector's sources and adapters; check one greedy step."""
    input_shape, units, shapes = _chain(k)
    inputs = [input_shape, *shapes[:-1]]  # module l's input h_{l-1}: h_j^c has inputs[j]'s shape
    modules = []
    layout = NetworkLayout.from_split(input_shape, shapes, (1,) * k)
    for module in range(1, k + 1):
        sources = selector_sources(selector, module, k, layout)
        adapters = {}
        for s in sources:
            source_shape = input_shape if s.is_input else inputs[s.index]
            try:
                adapters[s] = make_adapter(selector, s, tuple(source_shape), tuple(inputs[module - 1]))
            except Exception as exc:
                problems.add(f"adapter for {s} raised {type(exc).__name__}: {exc}", module, k)
                return
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shapes[module - 1][0], 3))
        modules.append(ContextModule(module, units[module - 1], sources, adapters, head, FinalCrossEntropy()))
    network = GreedyNetwork(modules)
    owner = {id(p): (int(name.split(".")[1]) + 1, _part(name)) for name, p in network.named_parameters()}
    x = torch.randn(BATCH, *input_shape)
    y = torch.tensor([0, 1])
    store = network.store(x, detach=True)  # as the engine trains greedily
    h = x
    for m in network.blocks:
        module = m.index
        context = store.gather(m.sources)
        kept = [c.clone() for c in context]
        for s, c in zip(m.sources, context):
            out = m.adapters[str(s)](c)
            if tuple(out.shape) != tuple(h.shape):
                problems.add(f"adapter for {s} returned shape {tuple(out.shape)}; expected {tuple(h.shape)} (h's shape)", module, k)
                return
        out = store.run(m, h)  # the engine's own wiring, on the context gathered above
        loss = m.loss(out, y, x).total
        reached = set()
        for leaf in graph_leaves(loss):
            reached.add(id(leaf))
            if id(leaf) not in owner:
                problems.add(
                    f"the module's loss reaches a tensor of shape {tuple(leaf.shape)} that is no parameter of "
                    f"the network; make adapter weights nn.Parameters of the adapter module", module, k,
                )
            elif owner[id(leaf)][0] != module:
                problems.add(
                    f"the module's loss reaches {owner[id(leaf)][1]} of module {owner[id(leaf)][0]}; "
                    f"build a new adapter on every call of adapter(...), never share one", module, k,
                )
        for s in m.sources:
            params = list(m.adapters[str(s)].parameters())
            if params and not any(id(p) in reached for p in params):
                problems.add(f"the adapter for {s} gets no gradient from the module's loss, so it never trains", module, k)
        loss.backward()
        for s, c, before in zip(m.sources, context, kept):
            if not torch.equal(c, before):
                problems.add(f"the adapter for {s} changed its input in place; compute out of place", module, k)
        h = out.detach()
        store.release(module)
