"""Activation-memory accounting: what each unit, head and adapter keeps alive for backward, and
what each module of a greedy network therefore costs.

The exact, deterministic measure counts the storages autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``): parameters and buffers are left out, and a storage
shared by views or in-place ops counts once. ``method = "shapes"`` (the default) counts them with
fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every op runs on shapes alone,
so an ImageNet-sized network, or one far too large for the machine, costs no arithmetic and no
memory to measure. A piece that needs real values (a data-dependent branch, an op fake tensors do
not support) is measured for real instead, with a note in :attr:`CostModel.notes`. ``method =
"saved"`` counts the same storages while running the real arithmetic (what timing needs too). On
CUDA, ``method = "cuda"`` instead takes ``torch.cuda.max_memory_allocated`` around each piece's
forward and backward, which also sees gradients and temporaries.

A module of units i..j costs its units, plus what it carries itself: its auxiliary head (and
decoder), its context adapters, its input and every context tensor the store keeps alive for
later modules while it trains. :class:`CostModel` measures every piece once and composes them,
both for a concrete split (:meth:`CostModel.plan_costs`) and as the ``Costs`` table a partitioner
optimises (:meth:`CostModel.costs`).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import attrs
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from contsup.model.components import Components, make_adapter, module_components, selector_sources, trace_shapes
from contsup.types import Costs, DatasetInfo, HeadSpec, NetworkLayout, Shape, Source
from contsup.config.recipe import Recipe
from contsup.errors import one_line
from contsup.protocols import ContextSelector

Method = Literal["shapes", "saved", "cuda"]
METHODS = ("shapes", "saved", "cuda")
StorageKey = tuple[str, int]


def storage_key(t: torch.Tensor) -> StorageKey | None:
    """What identifies ``t``'s memory: (device, address of its untyped storage); None if it has none.

    A fake or meta tensor has no data, so no address: its storage object itself identifies it
    (the address of the storage, which views and in-place results share and which stays unique
    while the storage lives; :class:`SavedStorages` keeps what it records alive)."""
    if t.layout != torch.strided:
        return None
    storage = t.untyped_storage()
    if isinstance(t, FakeTensor) or t.device.type == "meta":
        return None if storage.nbytes() == 0 else ("fake", int(storage._cdata))
    ptr = storage.data_ptr()
    return None if ptr == 0 else (str(t.device), ptr)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the whole storage behind ``t`` (a view counts its base's storage)."""
    return int(t.untyped_storage().nbytes())


class SavedStorages:
    """Records the unique storages autograd saves for backward while the context is active.

    Storages in ``exclude`` (parameters, buffers) are ignored; each storage counts once however
    many views or in-place results of it are saved. The recorded storages are held alive until
    :meth:`clear`, so an address is never reused within one count.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.exclude = {k for k in (storage_key(t) for t in exclude) if k is not None}
        self.saved: dict[StorageKey, tuple[int, Any]] = {}
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in self.exclude and key not in self.saved:
            self.saved[key] = (storage_bytes(t), t.untyped_storage())
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedStorages":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def keys(self) -> set[StorageKey]:
        return set(self.saved)

    def total(self, skip: Iterable[StorageKey | None] = ()) -> int:
        """Bytes of every recorded storage except those in ``skip``."""
        skipped = set(skip)
        return sum(n for k, (n, _) in self.saved.items() if k not in skipped)

    def clear(self) -> None:
        self.saved.clear()


def module_tensors(*modules: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``: what saved-tensor counts leave out."""
    out: list[torch.Tensor] = []
    for m in modules:
        out += list(m.parameters()) + list(m.buffers())
    return out


# -- pieces -----------------------------------------------------------------------------------


@attrs.frozen
class Piece:
    """What one unit, head or adapter costs on its own.

    ``own``: bytes it keeps for backward besides its named inputs and its output; ``saves``: which
    of those it keeps too ("in", "x", "out"), so that a storage two pieces share counts once;
    ``ms``: median milliseconds of its forward and backward (None when not timed); ``params``:
    how many parameters (elements) its module has.
    """

    own: int
    saves: frozenset[str]
    ms: float | None = None
    params: int = 0


PieceKind = Literal["unit", "head", "adapter"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backward(result: torch.Tensor) -> None:
    (result if result.dim() == 0 else result.float().sum()).backward()


def measure_piece(
    fn: Callable[[], torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    module: nn.Module,
    *,
    kind: PieceKind,
    method: Method = "saved",
    timing: bool = False,
    repeats: int = 3,
    exclude: Iterable[torch.Tensor] | None = None,
) -> Piece:
    """Measure ``fn()`` (which uses ``module`` on ``inputs``): saved bytes or CUDA peak, and time.

    With ``method = "saved"`` (or "shapes": the same count, ``fn`` then running on fake tensors)
    the storages autograd saves are counted, leaving out ``exclude`` (default: ``module``'s
    parameters and buffers). With ``method = "cuda"`` the piece's figure is its peak allocation
    over forward and backward minus what was allocated before; a unit's output is then taken out
    of ``own`` and marked saved ("out" counts once per module boundary), heads count their input
    as saved.
    """
    device = next((t.device for t in inputs.values()), torch.device("cpu"))
    if method in ("saved", "shapes"):
        if timing and method == "shapes":
            raise ValueError("timing needs real arithmetic: measure with method 'saved' or 'cuda'")
        with SavedStorages(module_tensors(module) if exclude is None else exclude) as rec:
            out = fn()
        input_keys = {name: storage_key(t) for name, t in inputs.items()}
        out_key = storage_key(out) if out.dim() > 0 else None
        if out_key in input_keys.values():
            out_key = None
        keys = rec.keys()
        saves = {name for name, k in input_keys.items() if k in keys}
        if out_key is not None and out_key in keys:
            saves.add("out")
        # only a unit's output can be shared (with the next unit or the head): elsewhere it is own
        own = rec.total([*input_keys.values(), out_key if kind == "unit" else None])
        del out
        rec.clear()
    elif method == "cuda":
        if device.type != "cuda":
            raise ValueError("method 'cuda' needs the piece's inputs on a CUDA device")
        module.zero_grad(set_to_none=True)
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        out_bytes = storage_bytes(out) if out.dim() > 0 else 0
        _backward(out)
        del out
        _sync(device)
        delta = max(0, torch.cuda.max_memory_allocated(device) - base)
        module.zero_grad(set_to_none=True)
        if kind == "unit":
            own, saves = max(0, delta - out_bytes), {"in", "out"}
        elif kind == "head":
            own, saves = delta, {"in"}
        else:
            own, saves = delta, set()
    else:
        raise ValueError(f"unknown measurement method '{method}'; use one of {', '.join(METHODS)}")
    ms = _time_piece(fn, module, device, repeats) if timing else None
    return Piece(int(own), frozenset(saves), ms, sum(int(p.numel()) for p in module.parameters()))


def _time_piece(fn: Callable[[], torch.Tensor], module: nn.Module, device: torch.device, repeats: int) -> float:
    """Median milliseconds of forward + backward over ``repeats`` runs after one warm-up."""
    times = []
    for r in range(repeats + 1):
        module.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        _backward(fn())
        _sync(device)
        if r:
            times.append(1000.0 * (time.perf_counter() - start))
    module.zero_grad(set_to_none=True)
    return statistics.median(times)


# -- modules ----------------------------------------------------------------------------------


@attrs.frozen
class ModuleCost:
    """A module's predicted training memory and time, with where the bytes go.

    ``breakdown``: ``units`` (its blocks, output included), ``head`` (aux head or final head, and
    decoder), ``adapters`` (context adapters), ``inputs`` (its input, x and the context tensors it
    keeps or saves, each once), ``backlink`` (with BackLink, the previous module's linked units,
    alive until this module's backward: an estimate from the units' own counts).
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


def last_uses(sources: Sequence[Sequence[Source]]) -> dict[int, int]:
    """For each feature h_j^c some module uses: the last (1-based) module that uses it."""
    out: dict[int, int] = {}
    for l, srcs in enumerate(sources, start=1):
        for s in srcs:
            if not s.is_input:
                out[s.index] = max(out.get(s.index, 0), l)
    return out


class _HeadLoss(nn.Module):
    """A head piece as one module: the head's loss on h, plus the decoder's on x when there is one."""

    def __init__(self, head: nn.Module, loss: Callable, decoder: nn.Module | None = None, decoder_loss: Callable | None = None) -> None:
        super().__init__()
        self.head, self.decoder = head, decoder
        self._losses = (loss, decoder_loss)  # a tuple: a loss that is a module stays unregistered, as it was

    def forward(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, decoder_loss = self._losses
        total = loss(self.head(h), y)
        if self.decoder is not None:
            total = total + decoder_loss(self.decoder(h), x)
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
        self.backlink = recipe.backlink.units if recipe.run.mode == "greedy" else 0
        self.recompute = recipe.context_options.recompute  # the adapters keep their inputs only
        self.info = info
        self.input_shape = tuple(info.input_shape)
        self.shapes = [tuple(s) for s in shapes]
        self.in_shapes = unit_input_shapes(self.input_shape, self.shapes)
        self.n = len(self.shapes)
        self._staged = bool(recipe.stages)
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

    def components(self, l: int, k: int) -> Components:
        """Module l's selector, objective and decoder, those of its stage (a recipe's ``[[modules]]``
        ranges are for its own K; without them every module of any K shares the sections')."""
        if self._staged and k != self.k:
            raise ValueError(f"the recipe's [[modules]] ranges are for K = {self.k}, not K = {k}")
        return self._components[min(l, self.k) - 1]

    def sources(self, k: int, sizes: Sequence[int] | None = None) -> list[tuple[Source, ...]]:
        """Each module's sources for the split ``sizes`` (default: the even split), chosen by its
        own stage's selector; a layout-aware selector is given that split's layout."""
        sizes = tuple(sizes) if sizes is not None else even_split(self.n, k)
        layout = NetworkLayout.from_split(self.input_shape, self.shapes, sizes)
        return [selector_sources(self.components(l, k).selector, l, k, layout) for l in range(1, k + 1)]

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
        module ``module`` of ``k``. Heads are measured once per shape, unless they are built
        from the backbone's later units (AugLocal's): those once per (unit, module, K)."""
        last = j == self.n - 1
        shape = self.shapes[j]
        with_decoder = with_decoder and not last
        spec = HeadSpec(
            shape, self.shapes[-1], self.info.num_classes,
            module=module, num_modules=k, last_unit=j, units=self._unit_modules, unit_shapes=self.shapes,
        )
        from_units = getattr(getattr(parts.objective, "options", None), "head", None) == "auglocal"
        where = (j, module, k) if from_units and not last else None
        key = (last, shape, with_decoder, None if last else id(parts), where)
        if key not in self._heads:
            self._heads[key] = self._measure_head(last, spec, parts, with_decoder)
        return self._heads[key]

    def _measure_head(self, last: bool, spec: HeadSpec, parts: Components, with_decoder: bool) -> Piece:
        import torch.nn.functional as F

        shape = spec.shape

        def build(real: bool) -> nn.Module:
            decoder = parts.decoder.build(shape, self.info) if with_decoder else None
            decoder_loss = (lambda out, x: parts.decoder.loss(out, x, self.info)) if with_decoder else None
            if last:
                return _HeadLoss(copy.deepcopy(self._final_head) if real else self._final_head, F.cross_entropy)
            head = parts.objective.head(spec)
            return _HeadLoss(head, parts.objective.loss, decoder, decoder_loss)

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
        l: int,
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
        ``previous_start`` the first unit of module l-1 (where BackLink's span may begin)."""
        parts = self.components(l, k)
        w_rec = parts.decoder.weights(l, k)[0] if parts.decoder is not None and l < k else 0.0
        head = self.head(j, parts, with_decoder=w_rec != 0.0, module=l, k=k)
        units = sum(self.units[u].own for u in range(i, j + 1))
        units += sum(self.boundary(u) for u in range(i, j)) + self.out_term(j, head)
        named: dict[str, int] = {}

        def feature(m: int) -> tuple[str, int, Shape]:
            if m == 0:
                return "x", self.x_bytes, self.input_shape
            start = feature_starts[m]
            return f"h{m}", self.in_bytes[start], self.in_shapes[start]

        if "in" in self.units[i].saves:
            name, size = ("x", self.x_bytes) if l == 1 else (f"h{l - 1}", self.in_bytes[i])
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
        linked = sum(self.unit_bytes(u) for u in range(max(previous_start, i - self.backlink), i)) if self.backlink and l > 1 else 0
        # with context.recompute the adapters' own activations are made again in backward, after
        # the units' backward has freed theirs: what training keeps through the forward leaves them out
        total = units + head.own + (0 if self.recompute else adapters) + inputs + linked
        timed = self.timing
        if timed:
            ms += sum(self.units[u].ms or 0.0 for u in range(i, j + 1)) + (head.ms or 0.0)
        breakdown = {"units": units, "head": head.own, "adapters": adapters, "inputs": inputs, "backlink": linked}
        return ModuleCost(l, (i, j), int(total), ms if timed else None, breakdown, params)

    def plan_costs(self, sizes: Sequence[int]) -> list[ModuleCost]:
        """Every module's cost for the split ``sizes``, with its true sources and their shapes."""
        k = len(sizes)
        starts = starts_of(sizes)
        sources = self.sources(k, sizes)
        last_use = last_uses(sources)
        feature_starts = {m: starts[m] for m in range(1, k)}
        out = []
        for l, (start, size) in enumerate(zip(starts, sizes), start=1):
            kept = [m for m in range(1, l) if last_use.get(m, 0) >= l]
            previous = starts[l - 2] if l > 1 else 0
            out.append(self.module_cost(l, start, start + size - 1, sources[l - 1], feature_starts, kept, k, previous))
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
            l = 1 if i == 0 else min(k, max(2, max(m for m, s in enumerate(est_starts, start=1) if s <= i)))
            feature_starts = {m: est_starts[m] for m in range(1, l - 1)}
            feature_starts[l - 1] = i
            kept = [m for m in range(1, l) if last_use.get(m, 0) >= l]
            row = []
            for j in range(i, n):
                cost = self.module_cost(l, i, j, sources[l - 1], feature_starts, kept, k, est_starts[l - 2] if l > 1 else 0)
                row.append(float(cost.bytes) - sum(units[i : j + 1]))
            overhead.append(tuple(row))
        return Costs(units, tuple(overhead))

    def peak(self, sizes: Sequence[int]) -> int:
        """The largest module cost of the split ``sizes``."""
        return max(c.bytes for c in self.plan_costs(sizes))


def even_split(n: int, k: int) -> tuple[int, ...]:
    """K unit counts as equal as possible, earlier modules one fewer (the uniform partitioner's cut)."""
    base, extra = divmod(n, k)
    return tuple(base + (1 if i >= k - extra else 0) for i in range(k))


def fitted_costs(model: CostModel, split: Callable[[Costs, int], Sequence[int]], k: int, rounds: int = 8) -> Costs:
    """A ``Costs`` table that is exact for the split ``split`` makes of it.

    The table's overhead assumes where earlier modules start (:meth:`CostModel.costs`); starting
    from the even split, it is rebuilt around the split it yields until the two agree (a fixed
    point, usually in one or two rounds). Without agreement after ``rounds``, the table whose
    split has the smallest true peak is returned.
    """
    like = even_split(model.n, k)
    tried: set[tuple[int, ...]] = set()
    seen: list[tuple[int, Costs]] = []
    for _ in range(rounds):
        tried.add(like)
        costs = model.costs(k, like)
        sizes = tuple(int(s) for s in split(costs, k))
        if sizes == like:
            return costs
        seen.append((model.peak(sizes), costs))
        if sizes in tried:  # a cycle: no table agrees with its own split
            break
        like = sizes
    return min(seen, key=lambda pc: pc[0])[1]


# -- the engine's entry points ----------------------------------------------------------------


def partition_costs(
    partitioner: Any, recipe: Recipe, parts: Any, shapes: Sequence[Shape], info: DatasetInfo, fake_mode: FakeTensorMode | None = None,
) -> Costs:
    """What ``partitioner.split`` is given: measured saved-tensor costs at the recipe's batch size
    when the partitioner asks for them (``needs_costs = True``), else one per unit for free.

    Measured at the partitioner's ``cost_batch_size`` when it has one (saved activations grow in
    proportion to the batch). Counted from shapes (fake tensors, no arithmetic) with the
    deterministic saved-tensor count, which is the CPU's to the byte, so a split (and with it the
    network's structure) is the same on every machine and a trained model always reloads.
    ``fake_mode``: the one ``parts`` were built in, when they are fake (:func:`recipe_parts`);
    a piece fake tensors cannot run then counts as keeping nothing (a lower bound) rather than
    being measured for real.
    """
    if not getattr(partitioner, "needs_costs", False):
        return Costs.uniform(len(shapes))
    batch = getattr(partitioner, "cost_batch_size", None)  # None: the recipe's batch
    model = CostModel(
        recipe, parts, shapes, info, device="cpu", method="shapes", batch_size=batch, fake_mode=fake_mode, real_fallback=fake_mode is None,
    )
    return fitted_costs(model, partitioner.split, recipe.partition.modules)


def recipe_parts(recipe: Recipe, fake: FakeTensorMode | None = None) -> tuple[Any, list[Shape], DatasetInfo]:
    """The recipe's backbone parts, unit output shapes and dataset info (fresh, seeded weights).

    With ``fake``, the parts are built and traced inside that fake mode: fake weights, shapes
    alone, nothing allocated however large the network or its input (give the same mode to
    :class:`CostModel`)."""
    info = recipe.dataset.create().info()
    with torch.random.fork_rng(devices=[]), (fake or contextlib.nullcontext()):
        torch.manual_seed(recipe.run.seed)
        parts = recipe.backbone.create().build(tuple(info.input_shape), info.num_classes)
        shapes = trace_shapes(list(parts.units), tuple(info.input_shape))
    return parts, shapes, info


@attrs.frozen
class ModuleMemory:
    """What training one module keeps for backward (the figure ``memory_balanced`` balances), at
    the recipe's batch, with the share of its context adapters and of its body's units; and the
    arithmetic of one image's forward through the body and through the adapters."""

    index: int
    bytes: int
    adapter_bytes: int
    body_bytes: int
    body_flops: int
    adapter_flops: int
    backlink_bytes: int = 0  # with BackLink: module l-1's last units, kept while module l trains (in ``bytes``)
    head_bytes: int = 0  # what its head (auxiliary or final, and decoder) keeps (in ``bytes``)

    @property
    def adapters_dominate(self) -> bool:
        """Whether the adapters cost more memory or arithmetic than the module's body."""
        return self.adapter_bytes > self.body_bytes or self.adapter_flops > self.body_flops


@attrs.frozen
class PlanMemory:
    """Every module's :class:`ModuleMemory`; ``units_bytes`` what the whole backbone's units keep
    (what end-to-end training keeps, its head aside). Counted from shapes at the recipe's batch,
    so ``measured_batch`` is ``batch`` and the figures are the CPU's saved bytes exactly (a
    piece fake tensors cannot run is measured for real, at that batch too)."""

    modules: tuple[ModuleMemory, ...]
    units_bytes: int
    batch: int
    measured_batch: int
    notes: tuple[str, ...] = ()  # pieces measured with real arithmetic, and why (CostModel.notes)


def forward_flops(module: nn.Module, shape: Shape) -> int:
    """Floating-point operations of one image of ``shape`` through ``module`` (torch's count)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros((1, *shape)))
    module.train(was_training)
    return int(counter.get_total_flops())


def backlink_spans(sizes: Sequence[int], units: int) -> list[tuple[int, int] | None]:
    """Per module l, the [first, last] units (0-based, inclusive) that module l+1's loss also
    trains with BackLink of ``units`` (the last ``units`` of module l, all of them when it has
    fewer); None for the last module and when ``units`` is 0."""
    out: list[tuple[int, int] | None] = []
    start = 0
    for l, n in enumerate(sizes, start=1):
        last = start + n - 1
        out.append((max(start, last - units + 1), last) if units > 0 and l < len(sizes) else None)
        start += n
    return out


def plan_memory(recipe: Recipe, network: nn.Module, plans: Sequence[Any], sizes: Sequence[int]) -> PlanMemory:
    """Each module's training memory for the split ``sizes`` of ``network`` (built from
    ``recipe``), as :class:`PlanMemory` says. With BackLink, module l's figure adds what module
    l-1's linked units keep (their saved activations, each unit's output included), alive until
    module l's backward: an estimate from the units' own measurements (docs/objectives.md)."""
    batch = measured = recipe.data.batch_size
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    parts, shapes, info = recipe_parts(recipe, fake)
    model = CostModel(recipe, parts, shapes, info, device="cpu", method="shapes", batch_size=batch, fake_mode=fake)
    out = []
    for cost, plan, m in zip(model.plan_costs(sizes), plans, network.blocks):
        adapter_flops = sum(
            forward_flops(m.adapters[str(s)], info.input_shape if s.is_input else plans[s.index].input_shape)
            for s in plan.sources
        )
        out.append(ModuleMemory(
            cost.index, cost.bytes, cost.breakdown["adapters"],
            cost.breakdown["units"], forward_flops(m.body, plan.input_shape), adapter_flops, cost.breakdown["backlink"],
            cost.breakdown["head"],
        ))
    units = sum(model.unit_bytes(u) for u in range(model.n))
    return PlanMemory(tuple(out), units, batch, measured, tuple(model.notes))


__all__ = [
    "ModuleMemory",
    "PlanMemory",
    "plan_memory",
    "backlink_spans",
    "forward_flops",
    "SavedStorages",
    "Piece",
    "measure_piece",
    "CostModel",
    "ModuleCost",
    "partition_costs",
    "recipe_parts",
]
