"""Counting what autograd saves for backward: the unique storages a piece of network keeps
alive (parameters and buffers left out, a storage shared by views or in-place ops once), and
:func:`measure_piece`, which measures one unit, head or adapter that way, on its CUDA peak, or
in time.

``method = "shapes"`` counts with fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``):
every op runs on shapes alone, so an ImageNet-sized network costs no arithmetic and no memory
to measure. ``method = "saved"`` counts the same storages while running the real arithmetic
(what timing needs too). On CUDA, ``method = "cuda"`` instead takes
``torch.cuda.max_memory_allocated`` around each piece's forward and backward, which also sees
gradients and temporaries.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable, Literal, Mapping

import attrs
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

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

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in self.exclude and key not in self.saved:
            self.saved[key] = (storage_bytes(t), t.untyped_storage())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedStorages":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
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


__all__ = [
    "Method", "METHODS", "storage_key", "storage_bytes", "SavedStorages", "module_tensors", "Piece", "PieceKind",
    "measure_piece",
]
