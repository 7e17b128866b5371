"""Calls into third-party components: an exception, or an answer of the wrong type or shape,
becomes one line naming the plugin, its distribution, the method and what was expected.

A recipe's component from a third-party plugin is created as a :class:`Guarded` instance
(:meth:`contsup.config.recipe.Chosen.create`): every call of a method the engine uses goes
through a wrapper that turns what the component raises into :class:`PluginFailed` and checks
what it returns, for every caller at once (training, evaluation, plans, cost models). Built-in
components are not wrapped: their failures are contsup's bugs, whose tracebacks should be seen.

What is checked, by kind: a context selector's ``sources`` (a tuple of :class:`Source` that
module l may use) and ``adapter`` (None, or a module mapping the source's shape to the target's,
tried on one input of fake tensors); an objective's ``head`` (a module giving one row per
image), ``loss`` (a scalar tensor, with a gradient when its input has one) and ``predict``
(None, or one label per image); a dataset's ``info`` (a :class:`DatasetInfo`), ``load`` (a
sized, indexable dataset whose items are then checked one by one: an input tensor of the info's
shape and an integer label in ``[0, classes)``) and ``classes`` (a sequence of names); a
backbone's ``build`` (units and a head that map the input to ``(B, num_classes)``); a decoder's
``build``, ``loss`` and ``weights``; a partitioner's ``split`` (K positive unit counts covering
the units); a training method's ``link`` (a unit count from 0 to the module's units). A method's
other hooks (``active``, ``part``, ``terms``, ``after_step``, ``prepare``, ``describe``,
``label``) are taken as they answer: only what they raise is named. (Loggers are not wrapped:
the observer that drives them names a failing logger itself, :mod:`contsup_loggers`.)
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any, Callable, Mapping

import attrs

from contsup.core.trial import describe, module_problem
from contsup.errors import ContsupError, UnreadableData, reason
from contsup.types import DatasetInfo, Source

FIX = "fix the plugin, or leave it out with CONTSUP_LOAD_PLUGINS (or uninstall {dist})"


class PluginFailed(ContsupError):
    """A third-party component raised, or broke its contract (a wrong type or shape): the run
    cannot go on, and the user cannot fix it in the recipe, so exit status 1, as a failed run."""

    exit_code = 1


class PluginItemFailed(UnreadableData):
    """A third-party dataset's item failed or is malformed (a label out of range, an input of
    the wrong shape), raised while a run reads its data: the loop stops as for an unreadable
    file (exit status 1, a checkpoint of the run so far)."""


@attrs.frozen
class Origin:
    """Where a recipe's component comes from: its plugin and distribution, the kind of component
    (a registry's attribute, ``"context_selectors"``) and the name the recipe uses."""

    plugin: str
    distribution: str
    version: str
    kind: str
    label: str  # the kind in words: "context selector"
    name: str
    source: str = ""  # the plugin's code: its package folder or module file (where its frames are)

    def known(self) -> bool:
        """Whether the plugin comes from an installed distribution (one registered in-process has none)."""
        return self.distribution not in ("", "?", "(not installed)")

    def who(self) -> str:
        dist = f" ({self.distribution} {self.version})" if self.known() else ""
        return f"{self.label} '{self.name}' of plugin '{self.plugin}'{dist}"

    def fix(self) -> str:
        return FIX.format(dist=self.distribution) if self.known() else "fix the plugin, or leave it out"


def _args(args: tuple, kwargs: Mapping[str, Any]) -> str:
    import torch

    def short(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"<{'x'.join(str(d) for d in v.shape) or 'scalar'} tensor>"
        if isinstance(v, (int, float, bool, str)) or (isinstance(v, tuple) and all(isinstance(t, int) for t in v)):
            return repr(v)
        return f"<{type(v).__name__}>"

    return ", ".join([short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()])


def plugin_frame(exc: BaseException, source: str) -> str:
    """Where in the plugin's own code (``source``: its folder or file) ``exc`` was raised, the
    innermost such frame: `` (at FILE, line N, in FUNC)``; "" when none is known."""
    if not source:
        return ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = os.path.abspath(frame.filename)
        if name == source or name.startswith(source.rstrip(os.sep) + os.sep):
            return f" (at {os.path.basename(name)}, line {frame.lineno}, in {frame.name})"
    return ""


def code_of(component: type) -> str:
    """The folder of the package that defines ``component`` (its file for a lone module), or ""."""
    module = sys.modules.get(getattr(component, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    if not path:
        return ""
    top = sys.modules.get(component.__module__.split(".")[0])
    top_file = getattr(top, "__file__", None) or path
    if os.path.basename(top_file) == "__init__.py":
        return os.path.dirname(os.path.abspath(top_file))
    return os.path.abspath(top_file)


def origin_of(component: type, info: Any, kind: str, label: str, name: str) -> Origin | None:
    """The :class:`Origin` of a recipe's component provided by the plugin ``info``
    (a :class:`~contsup.core.plugins.PluginInfo`); None for a built-in (not guarded)."""
    if info is None or getattr(info, "builtin", True):
        return None
    return Origin(info.name, info.distribution, info.version, kind, label, name, code_of(component))


def _raised(origin: Origin, method: str, args: tuple, kwargs: Mapping[str, Any], exc: BaseException) -> PluginFailed:
    what = "called sys.exit" if isinstance(exc, SystemExit) else f"raised {type(exc).__name__}"
    text = f": {reason(exc, 200)}" if not isinstance(exc, SystemExit) else f"({exc.code!r})"
    return PluginFailed(
        f"{origin.who()}: {method}({_args(args, kwargs)}) {what}{text}{plugin_frame(exc, origin.source)}; {origin.fix()}"
    )


def _wrong(origin: Origin, method: str, args: tuple, kwargs: Mapping[str, Any], got: str, expected: str) -> PluginFailed:
    return PluginFailed(
        f"{origin.who()}: {method}({_args(args, kwargs)}) returned {got}; expected {expected}; {origin.fix()}"
    )


def _pass_through() -> tuple[type[BaseException], ...]:
    """What a component may raise as it is: its own one-line errors, Ctrl-C, running out of GPU
    memory (the loop names the module)."""
    import torch

    return (ContsupError, KeyboardInterrupt, GeneratorExit, torch.cuda.OutOfMemoryError)


def _call(origin: Origin, method: str, fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:
        if isinstance(exc, _pass_through()):
            raise
        raise _raised(origin, method, args, kwargs, exc) from exc  # SystemExit too: a component must not end the program


# -- the checks, by kind and method: (result, args, kwargs) -> (problem or None, value to return) ----

Check = Callable[[Any, tuple, Mapping[str, Any]], "tuple[str | None, Any]"]


def _arg(args: tuple, kwargs: Mapping[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _sources(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    expected = "a tuple of contsup.types.Source"
    if result is None or isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
        return f"{describe(result)}; expected {expected}", result
    sources = tuple(result)
    module, k = _arg(args, kwargs, 0, "module"), _arg(args, kwargs, 1, "num_modules")
    seen: set[Source] = set()
    for s in sources:
        if not isinstance(s, Source):
            return f"{describe(sources)}, holding {describe(s)}; expected {expected}", result
        if s in seen:
            return f"the source {s} twice; expected each source once", result
        seen.add(s)
        if isinstance(module, int) and (module == 1 or (not s.is_input and not 0 <= s.index <= module - 2)):
            may = "no source (module 1 gets no context)" if module == 1 else f"sources among x and h0..h{module - 2}"
            return f"the source {s} for module {module} of {k}; expected {may}", result
    return None, sources


def _adapter(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    from torch import nn

    if result is None:
        return None, result
    if not isinstance(result, nn.Module):
        return f"{describe(result)}; expected an nn.Module (or None for the default adapter)", result
    source_shape, target_shape = _arg(args, kwargs, 1, "source_shape"), _arg(args, kwargs, 2, "target_shape")
    if source_shape is None or target_shape is None:
        return None, result
    want = (2, *target_shape)

    def check(got: tuple[int, ...]) -> str | None:
        return None if got == want else f"a module mapping (2, {', '.join(map(str, source_shape))}) to {got}"

    problem = module_problem(result, tuple(source_shape), check)
    return (f"{problem}; expected a module giving {want}, the shape of the input it is added to" if problem else None), result


def _head(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    from torch import nn

    if not isinstance(result, nn.Module):
        return f"{describe(result)}; expected an nn.Module (the auxiliary head)", result
    spec = _arg(args, kwargs, 0, "spec")
    shape = getattr(spec, "shape", None)
    if shape is None:
        return None, result
    problem = module_problem(result, tuple(shape), lambda got: None if got[:1] == (2,) else f"a module giving {got}")
    return (f"{problem}; expected a module giving one row per image" if problem else None), result


def _scalar_loss(result: Any, args: tuple, kwargs: Mapping[str, Any], inputs: tuple[int, ...] = (0,)) -> tuple[str | None, Any]:
    import torch

    if not isinstance(result, torch.Tensor):
        return f"{describe(result)}; expected a scalar torch.Tensor", result
    if result.numel() != 1:
        return f"{describe(result)}; expected a scalar tensor (the mean over the batch)", result
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for i, a in enumerate(args) if i in inputs)
    if needs_grad and not result.requires_grad:
        return "a tensor without a gradient (detached from its input); expected a loss that back-propagates", result
    return None, result


def _predict(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    import torch

    z = _arg(args, kwargs, 0, "z")
    if result is None:
        return None, result
    if not isinstance(result, torch.Tensor) or (isinstance(z, torch.Tensor) and tuple(result.shape) != (z.shape[0],)):
        return f"{describe(result)}; expected None or one label per image, shape ({z.shape[0] if isinstance(z, torch.Tensor) else 'B'},)", result
    return None, result


def _info(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    if not isinstance(result, DatasetInfo):
        return f"{describe(result)}; expected a contsup.types.DatasetInfo", result
    shape, n = result.input_shape, result.num_classes
    if not (isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        return f"a DatasetInfo with input_shape {shape!r}; expected positive whole numbers, (C, H, W)", result
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"a DatasetInfo with num_classes {n!r}; expected a whole number of classes", result
    return None, result


def _classes(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    if isinstance(result, (str, bytes)) or not isinstance(result, (tuple, list)) or not all(isinstance(c, str) for c in result):
        return f"{describe(result)}; expected a sequence of class names (strings)", result
    return None, tuple(result)


def _build(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    from torch import nn

    units, head = getattr(result, "units", None), getattr(result, "head", None)
    if units is None or head is None:
        return f"{describe(result)}; expected a contsup.types.BackboneParts (units and a head)", result
    units = list(units)
    if not units:
        return "no units; expected a BackboneParts with its minimal units (stem, then each block)", result
    bad = next((u for u in units if not isinstance(u, nn.Module)), None)
    if bad is not None or not isinstance(head, nn.Module):
        return (f"a BackboneParts holding {describe(bad if bad is not None else head)}; expected nn.Module units and head"), result
    shape, classes = _arg(args, kwargs, 0, "input_shape"), _arg(args, kwargs, 1, "num_classes")
    if shape is None or not isinstance(classes, int) or any(p.device.type == "meta" for p in head.parameters()):
        return None, result
    problem = module_problem(nn.Sequential(*units, head), tuple(shape),
                              lambda got: None if got == (2, classes) else f"a network giving {got} for (2, {', '.join(map(str, shape))})")
    return (f"{problem}; expected logits of shape (2, {classes})" if problem else None), result


def _decoder_build(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    from torch import nn

    if not isinstance(result, nn.Module):
        return f"{describe(result)}; expected an nn.Module (the decoder)", result
    return None, result


def _weights(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    ok = isinstance(result, (tuple, list)) and len(result) == 2 and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in result)
    if not ok:
        return f"{describe(result)}; expected two numbers, (reconstruction weight, local weight)", result
    return None, result


def _split(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    costs, k = _arg(args, kwargs, 0, "costs"), _arg(args, kwargs, 1, "k")
    n = len(getattr(costs, "units", ()) or ())
    try:
        sizes = [int(s) for s in result]
    except (TypeError, ValueError):
        return f"{describe(result)}; expected {k} unit counts", result
    if len(sizes) != k or any(s < 1 for s in sizes) or (n and sum(sizes) != n):
        return f"{sizes}; expected {k} positive unit counts summing to {n}", result
    return None, result


def _anything(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    """A method whose answer the engine takes as it is: only what it raises is named."""
    return None, result


def _link(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    units = _arg(args, kwargs, 2, "units")
    if isinstance(result, bool) or not isinstance(result, int) or result < 0 or (isinstance(units, int) and result > units):
        return f"{describe(result)}; expected a unit count from 0 to {units}", result
    return None, result


def _items(origin: Origin, target: Any) -> Callable[[Any, tuple, Mapping[str, Any]], tuple[str | None, Any]]:
    def check(result: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
        if result is None or not (hasattr(result, "__len__") and hasattr(result, "__getitem__")):
            return f"{describe(result)}; expected a dataset (with __len__ and __getitem__) of (image, label) items", result
        info = _call(origin, "info", target.info, (), {})
        problem, info = _info(info, (), {})
        if problem is not None:
            return None, result  # info() itself is checked where it is called
        return None, CheckedItems(result, origin, tuple(info.input_shape), info.num_classes, bool(_arg(args, kwargs, 0, "train")))
    return check


CHECKS: dict[tuple[str, str], Check] = {
    ("context_selectors", "sources"): _sources,
    ("context_selectors", "adapter"): _adapter,
    ("objectives", "head"): _head,
    ("objectives", "loss"): _scalar_loss,
    ("objectives", "predict"): _predict,
    ("datasets", "info"): _info,
    ("datasets", "classes"): _classes,
    ("backbones", "build"): _build,
    ("decoders", "build"): _decoder_build,
    ("decoders", "loss"): _scalar_loss,
    ("decoders", "weights"): _weights,
    ("partitioners", "split"): _split,
    ("methods", "link"): _link,
    **{("methods", name): _anything for name in ("active", "part", "terms", "after_step", "prepare", "describe", "label")},
}


class Guarded:
    """A third-party component seen through its contract: the methods the engine calls raise
    :class:`PluginFailed` naming the plugin instead of their own errors or wrong answers; every
    other attribute is the component's own."""

    __slots__ = ("_target", "_origin", "_cache")

    def __init__(self, target: Any, origin: Origin) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_origin", origin)
        object.__setattr__(self, "_cache", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target, origin = self._target, self._origin
        value = getattr(target, name)
        if not callable(value) or isinstance(value, type):
            return value
        if name == "load" and origin.kind == "datasets":
            check: Check | None = _items(origin, target)
        else:
            check = CHECKS.get((origin.kind, name))
        if check is None:  # not a method of the protocol: the component's own business
            return value
        cached = self._cache.get(name)
        if cached is not None and cached.__wrapped__ == value:
            return cached

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = _call(origin, name, value, args, kwargs)
            problem, result = check(result, args, kwargs)
            if problem is not None:
                got, _, expected = problem.partition("; expected ")
                raise _wrong(origin, name, args, kwargs, got, expected or "what the protocol says")
            return result

        self._cache[name] = call
        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __reduce__(self) -> tuple:
        return (Guarded, (self._target, self._origin))

    def __repr__(self) -> str:
        return f"Guarded({self._target!r})"

    @property
    def guarded(self) -> Any:
        """The component itself."""
        return self._target


def guard(instance: Any, origin: Origin | None) -> Any:
    """``instance`` seen through :class:`Guarded` when it comes from a third-party plugin."""
    return instance if origin is None else Guarded(instance, origin)


def create(component: type, options: Any, origin: Origin | None) -> Any:
    """A component instance from its options; a third-party one guarded (its ``__init__`` too)."""
    if origin is None:
        return component(options)
    return Guarded(_call(origin, "__init__", component, (options,), {}), origin)


# -- a third-party dataset's items ------------------------------------------------------------------


def _label(y: Any) -> int | str:
    """``y`` as a class index, or why it is not one."""
    import numpy as np
    import torch

    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            return f"a label tensor of shape ({', '.join(map(str, y.shape))})"
        if y.is_floating_point() or y.dtype == torch.bool:
            return f"the label {y.item()!r} ({y.dtype})"
        return int(y.item())
    if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
        return f"the label {y!r} ({type(y).__name__})"
    return int(y)


class CheckedItems:
    """A third-party dataset whose items are checked as they are read: each is ``(x, y)`` with
    ``x`` a tensor of the dataset's input shape and ``y`` an integer class in ``[0, classes)``;
    anything else, or an exception, is :class:`PluginItemFailed` naming the plugin and the item."""

    def __init__(self, items: Any, origin: Origin, shape: tuple[int, ...], classes: int, train: bool) -> None:
        self.items, self.origin, self.shape, self.classes, self.train = items, origin, shape, classes, train

    def __len__(self) -> int:
        return _call(self.origin, "load(...).__len__", self.items.__len__, (), {})

    def _fail(self, i: int, what: str) -> PluginItemFailed:
        split = "training" if self.train else "test"
        return PluginItemFailed(f"{self.origin.who()}: item {i} of its {split} set {what}; {self.origin.fix()}")

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        try:
            item = self.items[i]
        except BaseException as exc:
            if isinstance(exc, _pass_through()):
                raise
            raise self._fail(i, f"raised {type(exc).__name__}: {reason(exc, 200)}{plugin_frame(exc, self.origin.source)}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise self._fail(i, f"is {describe(item)}; expected (image tensor, integer label)")
        x, y = item
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise self._fail(i, f"has the image {describe(x)}; expected a tensor of shape {self.shape}")
        if tuple(x.shape) != self.shape:
            raise self._fail(i, f"has an image of shape {tuple(x.shape)}; expected {self.shape}, the input shape its info() gives")
        label = _label(y)
        if isinstance(label, str):
            raise self._fail(i, f"has {label}; expected an integer class index in 0..{self.classes - 1}")
        if not 0 <= label < self.classes:
            raise self._fail(i, f"has the label {label}, outside 0..{self.classes - 1} (its info() gives {self.classes} classes)")
        return item

    def __getattr__(self, name: str) -> Any:  # targets, classes and the like: the dataset's own
        if name.startswith("__") or name in ("items", "origin", "shape", "classes", "train"):
            raise AttributeError(name)
        return getattr(self.items, name)


__all__ = ["PluginFailed", "PluginItemFailed", "Origin", "Guarded", "guard", "create", "origin_of", "CheckedItems", "plugin_frame"]
