"""The cost model: what each module of a greedy network keeps alive for backward, composed from
its measured pieces.

A module of units i..j costs its units, plus what it carries itself: its auxiliary head (and
decoder), its context adapters, its input and every context tensor the store keeps alive for
later modules while it trains. :class:`CostModel` measures every piece once
(:mod:`contsup.model.saved`) and composes them, both for a concrete split
(:meth:`CostModel.plan_costs`) and as the ``Costs`` table a partitioner optimises
(:meth:`CostModel.costs`). A piece fake tensors cannot run is measured for real instead, with a
note in :attr:`CostModel.notes`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.errors import one_line
from contsup.model.components import Components, last_uses, make_adapter, method_part, module_components, selector_sources, training_method
from contsup.model.saved import METHODS, Method, Piece, PieceKind, measure_piece
from contsup.partition import even_split
from contsup.protocols import ContextSelector
from contsup.types import Costs, DatasetInfo, HeadSpec, NetworkLayout, Shape, Source



@attrs.frozen
class ModuleCost:
    """A module's predicted training memory and time, with where the bytes go.

    ``breakdown``: ``units`` (its blocks, output included), ``head`` (aux head or final head, and
    decoder), ``adapters`` (context adapters), ``inputs`` (its input, x and the context tensors it
    keeps or saves, each once), ``link`` (with a training method that links modules, the previous
    module's linked units, alive until this module's backward: an estimate from the units' own
    counts; also under the method's name).
    """

    index: int
    unit_range: tuple[int, int]  # [first, last], 0-based, inclusive
    bytes: int
    ms: float | None
    breakdown: dict[str, int]
    params: int = 0  # parameters (elements) of its units, head, decoder and adapters


def unit_input_shapes(input_shape: Shape, shapes: Sequence[Shape]) -> list[Shape]:
    """The input shape of every unit: x's for the first, the previous unit's output after."""
    return [tuple(input_shape), *[tuple(s) for s in shapes[:-1]]]


def starts_of(sizes: Sequence[int]) -> list[int]:
    """The first unit of each module."""
    out, s = [], 0
    for size in sizes:
        out.append(s)
        s += size
    return out


class _HeadLoss(nn.Module):
    """A head piece as one module: the head's loss on h, plus the decoder's on x when there is one,
    both reading what a training method's part makes of h (and its own loss) when there is one."""

    def __init__(
        self, head: nn.Module, loss: Callable, decoder: nn.Module | None = None, decoder_loss: Callable | None = None,
        part: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.head, self.decoder, self.part = head, decoder, part
        self._losses = (loss, decoder_loss)  # a tuple: a loss that is a module stays out of the parameters

    def forward(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, decoder_loss = self._losses
        part = self.part
        a = part.feature(h) if part is not None and hasattr(part, "feature") else h
        total = loss(self.head(a), y)
        if self.decoder is not None:
            total = total + decoder_loss(self.decoder(a), x)
        if part is not None and hasattr(part, "extra_loss"):
            total = total + part.extra_loss(h, y, x)
        return total


@contextlib.contextmanager
def _training(module: nn.Module):
    """``module`` in training mode while the context lasts, every submodule's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` by name, tied ones under each of their names."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


class CostModel:
    """The measured pieces of one recipe's network, and the module costs they predict.

    Units are measured on construction, heads and adapters on first use. With ``method =
    "shapes"`` every piece runs on fake tensors: the backbone's units with fake copies of their
    weights (the originals untouched; parts built in ``fake_mode`` as they are), new heads and
    adapters built fake; a piece that fails there
    is measured for real (with ``real_fallback``; without, it is counted as keeping nothing, a
    lower bound that allocates nothing) and noted in :attr:`notes`. Real measurements run on copies (the
    originals' weights and batch-norm statistics are untouched); their inputs come from a private
    generator and new modules are built under a forked RNG, so measuring never changes the global
    random state.
    """

    def __init__(
        self,
        recipe: Recipe,
        parts: Any,
        shapes: Sequence[Shape],
        info: DatasetInfo,
        *,
        device: torch.device | str = "cpu",
        method: Method = "shapes",
        timing: bool = False,
        repeats: int = 3,
        batch_size: int | None = None,
        fake_mode: FakeTensorMode | None = None,
        real_fallback: bool = True,
    ) -> None:
        self.device = torch.device(device)
        if method not in METHODS:
            raise ValueError(f"unknown measurement method '{method}'; use one of {', '.join(METHODS)}")
        if method == "cuda" and self.device.type != "cuda":
            raise ValueError("method 'cuda' needs a CUDA device")
        if method == "shapes" and timing:
            raise ValueError("timing needs real arithmetic: measure with method 'saved' or 'cuda'")
        self.method, self.timing, self.repeats = method, timing, repeats
        self.real_fallback = real_fallback
        self.batch = batch_size or recipe.data.batch_size
        self.k = recipe.partition.modules
        self.training_method = training_method(recipe)  # its parts count with the heads, its links with the modules
        self.recompute = recipe.context_options.recompute  # the adapters keep their inputs only
        self.info = info
        self.input_shape = tuple(info.input_shape)
        self.shapes = [tuple(s) for s in shapes]
        self.in_shapes = unit_input_shapes(self.input_shape, self.shapes)
        self.n = len(self.shapes)
        self._staged = bool(recipe.ranges)
        self._components = module_components(recipe, self.k)
        self._final_head = parts.head
        self._unit_modules = tuple(parts.units)
        self._gen = torch.Generator().manual_seed(0)
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None
        self.notes: list[str] = []
        if method == "shapes":
            self._fake = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
            with self._fake:
                self._fake_xy = (torch.empty((self.batch, *self.input_shape)), torch.zeros((self.batch,), dtype=torch.long))
        else:
            self._real_xy()
        self.x_bytes = self._bytes_of(self.input_shape)
        self.in_bytes = [self._bytes_of(s) for s in self.in_shapes]
        self.out_bytes = [self._bytes_of(s) for s in self.shapes]
        self.units = [self._measure_unit(u, unit) for u, unit in enumerate(parts.units)]
        self._heads: dict[tuple, Piece] = {}
        self._adapters: dict[tuple, Piece] = {}

    def components(self, module: int, k: int) -> Components:
        """Module l's selector, objective and decoder, those of its stage (a recipe's ``[[modules]]``
        ranges are for its own K; without them every module of any K shares the sections')."""
        if self._staged and k != self.k:
            raise ValueError(f"the recipe's [[modules]] ranges are for K = {self.k}, not K = {k}")
        return self._components[min(module, self.k) - 1]

    def sources(self, k: int, sizes: Sequence[int] | None = None) -> list[tuple[Source, ...]]:
        """Each module's sources for the split ``sizes`` (default: the even split), chosen by its
        own stage's selector; a layout-aware selector is given that split's layout."""
        sizes = tuple(sizes) if sizes is not None else even_split(self.n, k)
        layout = NetworkLayout.from_split(self.input_shape, self.shapes, sizes)
        return [selector_sources(self.components(module, k).selector, module, k, layout) for module in range(1, k + 1)]

    # measuring

    def _rng(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _real_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real batch (x, y), drawn on first need from the private generator."""
        if self._real is None:
            x = self._randn(self.input_shape)
            y = torch.randint(0, self.info.num_classes, (self.batch,), generator=self._gen).to(self.device)
            self._real = (x, y)
        return self._real

    def _xy(self, fake: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fake_xy if fake else self._real_xy()

    def _randn(self, shape: Shape, grad: bool = False, fake: bool = False) -> torch.Tensor:
        if fake:  # called inside the fake mode: shapes only
            t = torch.empty((self.batch, *shape))
        else:
            t = torch.randn((self.batch, *shape), generator=self._gen).to(self.device)
        if grad:  # a non-leaf that requires grad, as inside a module; in-place ops stay legal
            t = t.requires_grad_().clone()
        return t

    def _bytes_of(self, shape: Shape) -> int:
        return self.batch * int(torch.Size(shape).numel()) * torch.empty((), dtype=torch.get_default_dtype()).element_size()

    def _measure(
        self,
        what: str,
        kind: PieceKind,
        build: Callable[[bool], nn.Module],
        args: Callable[[bool], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]],
    ) -> Piece:
        """One piece: ``build(real)`` makes its module (``real``: weights it may change, i.e. a
        copy of the backbone's), ``args(fake)`` its call arguments and named inputs."""
        if self.method == "shapes":
            try:
                return self._measure_fake(kind, build, args)
            except Exception as exc:  # a piece fake tensors cannot run: measured for real below
                how = "measured with real arithmetic" if self.real_fallback else "counted as keeping nothing (a lower bound)"
                note = f"{what}: {how}, fake tensors could not run it ({type(exc).__name__}: {one_line(str(exc))})"
                self.notes.append(note[:300])
                if not self.real_fallback:
                    with self._rng(), self._fake:
                        module = build(False)
                    return Piece(0, frozenset(), None, sum(int(t.numel()) for t in module.parameters()))
        with self._rng():
            module = build(True)
        if any(isinstance(t, FakeTensor) for _, t in named_tensors(module)):
            raise ValueError(f"{what}: its weights are fake, and it cannot be measured from shapes alone")
        module = module.to(self.device).train()
        call, named = args(False)
        method = "saved" if self.method == "shapes" else self.method
        return measure_piece(lambda: module(*call), named, module, kind=kind, method=method, timing=self.timing, repeats=self.repeats)

    def _measure_fake(
        self,
        kind: PieceKind,
        build: Callable[[bool], nn.Module],
        args: Callable[[bool], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]],
    ) -> Piece:
        with self._rng(), self._fake:
            module = build(False)
        with self._fake, _training(module):
            state = {name: t if isinstance(t, FakeTensor) else self._fake.from_tensor(t) for name, t in named_tensors(module)}
            call, named = args(True)
            fn = lambda: torch.func.functional_call(module, state, call, strict=False)  # noqa: E731
            return measure_piece(fn, named, module, kind=kind, method="shapes", exclude=list(state.values()))

    def _measure_unit(self, u: int, unit: nn.Module) -> Piece:
        def args(fake: bool):
            h = self._randn(self.in_shapes[u], grad=True, fake=fake)
            return (h,), {"in": h}

        return self._measure(f"unit {u}", "unit", lambda real: copy.deepcopy(unit) if real else unit, args)

    def head(self, j: int, parts: Components, with_decoder: bool = False, module: int = 0, k: int = 0) -> Piece:
        """The piece of the head on unit j's output: the final head and loss if j is the last
        unit, else ``parts``' auxiliary head and loss (and its decoder's reconstruction) for
        module ``module`` of ``k``. Heads are measured once per shape, unless the objective's
        ``head_key(spec)`` says where else a head depends on (a head built from the backbone's later
        units) or the training method adds a part of its own to each module."""
        last = j == self.n - 1
        shape = self.shapes[j]
        with_decoder = with_decoder and not last
        spec = HeadSpec(
            shape, self.shapes[-1], self.info.num_classes,
            module=module, num_modules=k, last_unit=j, units=self._unit_modules, unit_shapes=self.shapes,
        )
        head_key = getattr(parts.objective, "head_key", None)
        where = None if last else (head_key(spec) if head_key is not None else None)
        if not last and hasattr(self.training_method, "part"):
            where = (where, j, module, k)
        key = (last, shape, with_decoder, None if last else id(parts), where)
        if key not in self._heads:
            self._heads[key] = self._measure_head(last, spec, parts, with_decoder)
        return self._heads[key]

    def _measure_head(self, last: bool, spec: HeadSpec, parts: Components, with_decoder: bool) -> Piece:
        import torch.nn.functional as F

        shape = spec.shape

        def build(real: bool) -> nn.Module:
            if last:
                return _HeadLoss(copy.deepcopy(self._final_head) if real else self._final_head, F.cross_entropy)
            part = method_part(self.training_method, spec, parts.objective)
            read = attrs.evolve(spec, shape=tuple(getattr(part, "feature_shape", spec.shape)))
            decoder = parts.decoder.build(read.shape, self.info) if with_decoder else None
            decoder_loss = (lambda out, x: parts.decoder.loss(out, x, self.info)) if with_decoder else None
            head = parts.objective.head(read)
            return _HeadLoss(head, parts.objective.loss, decoder, decoder_loss, part)

        def args(fake: bool):
            h = self._randn(shape, grad=True, fake=fake)
            x, y = self._xy(fake)
            return (h, x, y), {"in": h, "x": x}

        return self._measure(f"the head on a {list(shape)} feature", "head", build, args)

    def adapter(self, source: Source, source_shape: Shape, target_shape: Shape, selector: ContextSelector) -> Piece:
        """The piece of the adapter M_{l,s} ``selector`` makes from ``source_shape`` to ``target_shape``."""
        key = (id(selector), source.is_input, tuple(source_shape), tuple(target_shape))
        if key not in self._adapters:

            def args(fake: bool):
                x, _ = self._xy(fake)
                if tuple(source_shape) == self.input_shape:
                    return (x,), {"in": x}
                c = self._randn(tuple(source_shape), fake=fake)
                return (c,), {"in": c}

            build = lambda real: make_adapter(selector, source, tuple(source_shape), tuple(target_shape))  # noqa: E731
            what = f"the adapter from {source} {list(source_shape)} to {list(target_shape)}"
            self._adapters[key] = self._measure(what, "adapter", build, args)
        return self._adapters[key]

    # composing

    def boundary(self, u: int) -> int:
        """Bytes of unit u's output when it sits inside a module (saved by u or by unit u+1)."""
        if u == self.n - 1:
            return self.out_term(u, self.head(u, self.components(self.k, self.k)))
        saved = "out" in self.units[u].saves or "in" in self.units[u + 1].saves
        return self.out_bytes[u] if saved else 0

    def out_term(self, j: int, head: Piece) -> int:
        """Bytes of a module's output (ending at unit j) if its last unit or its head keeps it."""
        return self.out_bytes[j] if "out" in self.units[j].saves or "in" in head.saves else 0

    def unit_bytes(self, u: int) -> int:
        """Unit u's cost as a partitioner sees it: what it keeps, its output included."""
        return self.units[u].own + self.boundary(u)

    def module_cost(
        self,
        module: int,
        i: int,
        j: int,
        sources: Sequence[Source],
        feature_starts: Mapping[int, int],
        kept: Iterable[int],
        k: int,
        previous_start: int = 0,
    ) -> ModuleCost:
        """Module l of k over units i..j with ``sources``; ``feature_starts[m]`` is the first unit
        of module m+1 (whose input is h_m^c); ``kept`` the features the store holds meanwhile;
        ``previous_start`` the first unit of module l-1 (where a method's link may begin)."""
        parts = self.components(module, k)
        w_rec = parts.decoder.weights(module, k)[0] if parts.decoder is not None and module < k else 0.0
        head = self.head(j, parts, with_decoder=w_rec != 0.0, module=module, k=k)
        units = sum(self.units[u].own for u in range(i, j + 1))
        units += sum(self.boundary(u) for u in range(i, j)) + self.out_term(j, head)
        named: dict[str, int] = {}

        def feature(m: int) -> tuple[str, int, Shape]:
            if m == 0:
                return "x", self.x_bytes, self.input_shape
            start = feature_starts[m]
            return f"h{m}", self.in_bytes[start], self.in_shapes[start]

        if "in" in self.units[i].saves:
            name, size = ("x", self.x_bytes) if module == 1 else (f"h{module - 1}", self.in_bytes[i])
            named[name] = size
        if "x" in head.saves:
            named["x"] = self.x_bytes
        adapters, ms = 0, 0.0
        params = sum(self.units[u].params for u in range(i, j + 1)) + head.params
        for s in sources:
            name, size, shape = ("x", self.x_bytes, self.input_shape) if s.is_input else feature(s.index)
            piece = self.adapter(s, shape, self.in_shapes[i], parts.selector)
            adapters += piece.own
            params += piece.params
            ms += piece.ms or 0.0
            if "in" in piece.saves or self.recompute:  # recomputed, an adapter keeps its input for backward
                named[name] = size
        for m in kept:
            if m >= 1:
                name, size, _ = feature(m)
                named[name] = size
        inputs = sum(named.values())
        linked = self.linked_bytes(module, k, previous_start, i)
        # with context.recompute the adapters' own activations are made again in backward, after
        # the units' backward has freed theirs: what training keeps through the forward leaves them out
        total = units + head.own + (0 if self.recompute else adapters) + inputs + linked
        timed = self.timing
        if timed:
            ms += sum(self.units[u].ms or 0.0 for u in range(i, j + 1)) + (head.ms or 0.0)
        breakdown = {"units": units, "head": head.own, "adapters": adapters, "inputs": inputs, "link": linked}
        if getattr(self.training_method, "link", None) is not None:
            breakdown[self.training_method.name] = linked
        return ModuleCost(module, (i, j), int(total), ms if timed else None, breakdown, params)

    def linked_bytes(self, module: int, k: int, previous_start: int, start: int) -> int:
        """What the previous module's linked units keep while module ``module`` (from unit
        ``start``) trains: the units the method's link reaches, measured alone."""
        link = getattr(self.training_method, "link", None)
        if link is None or module < 2:
            return 0
        span = int(link(module - 1, k, start - previous_start))
        return sum(self.unit_bytes(u) for u in range(max(previous_start, start - span), start)) if span else 0

    def plan_costs(self, sizes: Sequence[int]) -> list[ModuleCost]:
        """Every module's cost for the split ``sizes``, with its true sources and their shapes."""
        k = len(sizes)
        starts = starts_of(sizes)
        sources = self.sources(k, sizes)
        last_use = last_uses(sources)
        feature_starts = {m: starts[m] for m in range(1, k)}
        out = []
        for module, (start, size) in enumerate(zip(starts, sizes), start=1):
            kept = [m for m in range(1, module) if last_use.get(m, 0) >= module]
            previous = starts[module - 2] if module > 1 else 0
            out.append(self.module_cost(module, start, start + size - 1, sources[module - 1], feature_starts, kept, k, previous))
        return out

    def costs(self, k: int | None = None, like: Sequence[int] | None = None) -> Costs:
        """The ``Costs`` table for K modules: ``units[u]`` what unit u keeps (output included),
        ``overhead[i][j-i]`` the rest of a module over units i..j.

        A module's own overhead depends on its index and, for feature sources, on where earlier
        modules start. The table takes both from the split ``like`` (default: the even split),
        so it is exact for every module of that split, for K = n and for input-only context.
        """
        k = k or self.k
        n = self.n
        like = tuple(like) if like is not None else even_split(n, k)
        units = tuple(float(self.unit_bytes(u)) for u in range(n))
        est_starts = starts_of(like)
        sources = self.sources(k, like)
        last_use = last_uses(sources)
        overhead = []
        for i in range(n):
            module = 1 if i == 0 else min(k, max(2, max(m for m, s in enumerate(est_starts, start=1) if s <= i)))
            feature_starts = {m: est_starts[m] for m in range(1, module - 1)}
            feature_starts[module - 1] = i
            kept = [m for m in range(1, module) if last_use.get(m, 0) >= module]
            row = []
            for j in range(i, n):
                cost = self.module_cost(module, i, j, sources[module - 1], feature_starts, kept, k, est_starts[module - 2] if module > 1 else 0)
                row.append(float(cost.bytes) - sum(units[i : j + 1]))
            overhead.append(tuple(row))
        return Costs(units, tuple(overhead))

    def peak(self, sizes: Sequence[int]) -> int:
        """The largest module cost of the split ``sizes``."""
        return max(c.bytes for c in self.plan_costs(sizes))


__all__ = ["CostModel", "ModuleCost", "even_split", "starts_of", "last_uses", "unit_input_shapes"]  # even_split: re-exported
