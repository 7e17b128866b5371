"""``check_method``: a training method against the greedy step that serves it, on a real (small)
network: its hooks' answers, its gradient reach, its step after each module, its determinism,
and that an inactive method trains plain greedy."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import torch
from torch import nn

from contsup.config.schema import Chosen
from contsup.model.network import GreedyNetwork, build_network
from contsup.testing.plugins import recipe as as_recipe
from contsup.testing.report import Problems, instance, who
from contsup.training.strategies import GreedyStrategy, StepStats

BATCH = 8
STEPS = 2

# The network check_method trains unless given a recipe: ResNet-20 on 3x8x8 synthetic images.
DEFAULT_RECIPE = """
[run]
seed = 0
[data]
use = "synthetic"
shape = [3, 8, 8]
train_size = 16
test_size = 16
batch_size = {batch}
[backbone]
use = "cifar_resnet20"
[partition]
modules = {modules}
[context]
use = "R1E"
[optimizer]
lr = 0.05
"""


def check_method(method: Any, *plugins: object, recipe: Any = None, modules: Sequence[int] = (2, 4)) -> None:
    """Check a training method (a class, built with default options, or an instance).

    The method trains ``recipe``'s network (a :class:`~contsup.config.recipe.Recipe`, a path or
    TOML text, validated with the built-ins plus ``plugins``; default: ResNet-20 on 3x8x8
    synthetic images with R1E context, split into each K of ``modules``) for two greedy steps on
    random batches, through ``GreedyStrategy`` as a run does. It checks:

    - ``active()`` is a bool; ``link(l, K, units)`` is an integer in 0..units, and 0 for the last
      module (no module comes after it to finish its step);
    - inactive (``active()`` False): the greedy step serving its hooks trains bit-identically to
      plain greedy training (the engine does not call an inactive method: its hooks must agree);
    - active: no parameter of its parts is also another module's; every module's loss is finite;
      module l's loss gives gradient to module l's parameters (its part included) and to the last
      ``link(l-1, K, units)`` units of module l-1, and to nothing else; ``after_step(module l,
      network)`` changes no parameter or buffer outside module l;
    - two runs from the same seed end bit-identical.

    Raises AssertionError with one line per problem, naming the K (and the module).
    """
    method = instance(method)
    problems = Problems(who("method", method), "training method")
    if not callable(getattr(method, "active", None)):
        problems.add("it has no active() method; see contsup.protocols.Method")
        problems.raise_if_any()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small network: more threads only wait on each other
    try:
        with torch.random.fork_rng(devices=[]):
            for r in _recipes(recipe, plugins, modules):
                _check_at(method, _with_method(r, method), _with_method(r, None), problems)
    finally:
        torch.set_num_threads(threads)
    problems.raise_if_any()


def _recipes(recipe: Any, plugins: tuple, modules: Sequence[int]) -> list[Any]:
    if recipe is not None:
        return [as_recipe(recipe, *plugins)]
    return [as_recipe(DEFAULT_RECIPE.format(batch=BATCH, modules=k), *plugins) for k in modules]


def _with_method(recipe: Any, method: Any) -> Any:
    """``recipe`` training greedily with ``method`` (this very instance) as its only method
    (None: with none, whatever tables the recipe has)."""
    chosen = Chosen(getattr(method, "name", "method"), lambda _options: method, getattr(method, "options", None), "check_method")
    return attrs.evolve(recipe, run=attrs.evolve(recipe.run, mode="greedy"), methods=(chosen,) if method is not None else ())


def _check_at(method: Any, recipe: Any, plain: Any, problems: Problems) -> None:
    k = recipe.partition.modules
    active = _active(method, k, problems)
    if active is None:
        return
    try:
        network = _network(recipe)
    except Exception as exc:
        problems.add(f"building the network with its parts raised {type(exc).__name__}: {_text(exc)}", k=k)
        return
    if not _links(method, network, problems):
        return
    if not active:
        _inactive(method, plain, problems)
        return
    _shared(network, problems)
    first = _run(recipe, method, problems, watch=True)
    if first is None:
        return
    for module in range(1, k + 1):
        _reach(recipe, method, module, problems)
    second = _run(recipe, method, problems)
    if second is not None and not _same(first, second):
        problems.add("two runs from the same seed end with different weights; draw randomness from torch's seeded generator", k=k)


def _active(method: Any, k: int, problems: Problems) -> bool | None:
    try:
        active = method.active()
    except Exception as exc:
        problems.add(f"active() raised {type(exc).__name__}: {_text(exc)}", k=k)
        return None
    if not isinstance(active, bool):
        problems.add(f"active() returned {active!r}; expected True or False", k=k)
        return None
    return active


def _links(method: Any, network: GreedyNetwork, problems: Problems) -> bool:
    link = getattr(method, "link", None)
    if link is None:
        return True
    k, ok = network.num_modules, True
    for m in network.blocks:
        units = len(m.body)
        try:
            n = link(m.index, k, units)
        except Exception as exc:
            problems.add(f"link(l, K, units) raised {type(exc).__name__}: {_text(exc)}", m.index, k)
            return False
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= units:
            problems.add(f"link(l, K, {units}) returned {n!r}; expected an integer in 0..{units}", m.index, k)
            ok = False
        elif m.index == k and n:
            problems.add(f"link(K, K, units) returned {n}; expected 0: no module after the last one finishes its step", m.index, k)
            ok = False
    return ok


def _network(recipe: Any) -> GreedyNetwork:
    torch.manual_seed(0)
    return build_network(recipe).network.train()


def _batches(network: GreedyNetwork, n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape, classes = network.info.input_shape, network.info.num_classes
    return [(torch.randn(BATCH, *shape, generator=g), torch.randint(0, classes, (BATCH,), generator=g)) for _ in range(n)]


def _strategy(recipe: Any, network: GreedyNetwork, method: Any) -> GreedyStrategy:
    return GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, method=method)


def _run(recipe: Any, method: Any, problems: Problems, watch: bool = False) -> dict[str, torch.Tensor] | None:
    """The network's state after ``STEPS`` greedy steps with ``method`` (None: the step failed);
    ``watch``: check the losses and what ``after_step`` changes."""
    network = _network(recipe)
    k = network.num_modules
    served = _Watched(method, problems, k) if watch and method is not None else method
    strategy = _strategy(recipe, network, served)

    def check(module: int, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            problems.add(f"the module's loss is {float(loss.detach())}; expected a finite number", module, k)

    try:
        for x, y in _batches(network):
            strategy.step(x, y, StepStats(k), check if watch else _no_check)
    except Exception as exc:
        problems.add(f"the greedy step raised {type(exc).__name__}: {_text(exc)} (module {strategy.active_module})", k=k)
        return None
    return {name: t.detach().clone() for name, t in network.state_dict().items()}


def _no_check(_module: int, _loss: torch.Tensor) -> None:
    pass


def _inactive(method: Any, plain: Any, problems: Problems) -> None:
    """An inactive method, served anyway, must train as plain greedy does."""
    k = plain.partition.modules
    bare = _run(plain, None, problems)
    served = _run(plain, method, problems)
    if bare is not None and served is not None and not _same(bare, served):
        problems.add(
            "active() is False, yet the greedy step serving its hooks trains differently from plain greedy; "
            "an inactive method's hooks must change nothing (link 0, terms (total, None), no part)", k=k,
        )


def _shared(network: GreedyNetwork, problems: Problems) -> None:
    owners: dict[int, list[int]] = {}
    for m in network.blocks:
        for q in m.parameters():
            owners.setdefault(id(q), []).append(m.index)
    for m in network.blocks:
        if m.part is None:
            continue
        others = sorted({i for q in m.part.parameters() for i in owners[id(q)] if i != m.index})
        if others:
            problems.add(
                f"its part holds parameters of module {', '.join(map(str, others))}; copy what it reads "
                "(contsup.layers.fresh_copy), never share it", m.index, network.num_modules,
            )


def _reach(recipe: Any, method: Any, module: int, problems: Problems) -> None:
    """One step in which only module ``module`` has a loss: which parameters a gradient reached
    (hooks on every parameter: a later module's zero_grad would hide it from ``.grad``)."""
    network = _network(recipe)
    k = network.num_modules
    strategy = _strategy(recipe, network, _OnlyModule(method, module))
    reached: set[int] = set()
    params = {id(q): q for q in network.parameters() if q.requires_grad}
    hooks = [q.register_hook(lambda g, i=i: reached.add(i) if bool(g.abs().sum() > 0) else None) for i, q in params.items()]
    x, y = _batches(network, 1)[0]
    try:
        strategy.step(x, y, StepStats(k), _no_check)
    except Exception as exc:
        problems.add(f"the greedy step raised {type(exc).__name__}: {_text(exc)}", module, k)
        return
    finally:
        for hook in hooks:
            hook.remove()
    allowed = {id(q) for q in network.blocks[module - 1].parameters()}
    span = strategy.links[module - 2] if module > 1 else 0
    if span:
        allowed |= {id(q) for unit in list(network.blocks[module - 2].body)[-span:] for q in unit.parameters()}
    outside = sorted({m.index for m in network.blocks for q in m.parameters() if id(q) in reached - allowed})
    if outside:
        says = f"its link reaches the last {span} unit(s) of module {module - 1} only" if span else "it links nothing into the module before"
        problems.add(f"the module's loss gives gradient to module(s) {', '.join(map(str, outside))} outside its reach ({says})", module, k)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical, NaN equal to NaN (a run gone NaN is reported once, by what made it)."""
    return a.keys() == b.keys() and all(a[n].shape == b[n].shape and bool(((a[n] == b[n]) | (a[n] != a[n]) & (b[n] != b[n])).all()) for n in a)


class _Proxy:
    """The method under test, with some hooks wrapped; every other attribute is the method's."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)


class _OnlyModule(_Proxy):
    """Every module's loss terms switched off but module ``only``'s."""

    def __init__(self, method: Any, only: int) -> None:
        super().__init__(method)
        inner: Callable | None = getattr(method, "terms", None)

        def terms(module: int, num_modules: int, total: torch.Tensor, extra: Any) -> tuple:
            if module != only:
                return None, None
            return inner(module, num_modules, total, extra) if inner is not None else (total, None)

        self.terms = terms


class _Watched(_Proxy):
    """``terms`` checked: (linked, own), each None or a finite scalar; ``after_step`` checked: it
    may change module l's parameters and buffers, nothing else."""

    def __init__(self, method: Any, problems: Problems, k: int) -> None:
        super().__init__(method)
        split = getattr(method, "terms", None)
        if split is not None:

            def terms(module: int, num_modules: int, total: torch.Tensor, extra: Any) -> tuple:
                out = split(module, num_modules, total, extra)
                if not isinstance(out, tuple) or len(out) != 2:
                    problems.add(f"terms returned {type(out).__name__}; expected (linked, own)", module, k)
                elif not all(t is None or (isinstance(t, torch.Tensor) and t.dim() == 0 and bool(torch.isfinite(t.detach()))) for t in out):
                    problems.add("terms returned a term that is not None or a finite scalar tensor", module, k)
                return out

            self.terms = terms
        inner = getattr(method, "after_step", None)
        if inner is None:
            return

        def after_step(module: nn.Module, network: GreedyNetwork) -> None:
            own = {id(t) for t in [*module.parameters(), *module.buffers()]}
            others = [(n, t) for n, t in [*network.named_parameters(), *network.named_buffers()] if id(t) not in own]
            before = [t.detach().clone() for _, t in others]
            inner(module, network)
            changed = [n for (n, t), b in zip(others, before) if not torch.equal(t.detach(), b)]
            if changed:
                problems.add(f"after_step changed {changed[0]} of another module; it may change its own module's only", module.index, k)

        self.after_step = after_step


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


__all__ = ["check_method", "DEFAULT_RECIPE"]
