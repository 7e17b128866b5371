"""``run.compile = true``: every module's pieces (its context adapters, its body, its head and
decoder) run under ``torch.compile``, each piece compiled on its own so that greedy training
keeps one graph per module and the network's parameters, state dict and checkpoints stay those
of the uncompiled network.

A piece that cannot compile (its first call raises inside ``torch.compile``) runs uncompiled
from then on, with one warning naming it. A deep copy of a compiled network is compiled again,
on its own weights, when it first runs.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from contsup.errors import first_line


class CompiledForward:
    """The ``forward`` of one piece under ``torch.compile``, falling back to the plain forward
    (with one warning naming ``name``) when compiling or running the compiled code fails."""

    def __init__(self, piece: nn.Module, name: str) -> None:
        self.piece, self.name = piece, name
        self.eager = type(piece).forward.__get__(piece)
        self.compiled: Any = torch.compile(_own_code(self.eager), dynamic=False)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run the piece as it is
            self.failed = True
            warnings.warn(f"run.compile: {self.name} cannot compile ({type(exc).__name__}: {first_line(exc)}); it runs uncompiled", stacklevel=2)
            return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "CompiledForward":
        twin = CompiledForward(copy.deepcopy(self.piece, memo), self.name)
        twin.failed = self.failed
        return twin


def _own_code(forward: Any) -> Any:
    """``forward`` behind a function whose code object is this piece's alone.

    torch.compile keeps compiled code, its guards and the shapes it has seen per code object,
    and every piece's forward reaches it through the same wrapper code: one network's pieces
    (dozens: each module's body, head and adapters) would share one cache of
    ``torch._dynamo.config.recompile_limit`` entries (8), and the pieces past it would run
    uncompiled without a word, while the shapes changing from piece to piece would recompile
    the rest for dynamic shapes. With a code object each, every piece is compiled for its own
    static shapes and keeps its own entries (training and evaluation mode)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    call.__code__ = call.__code__.replace()  # an equal code object, but a new one
    return call


def pieces(network: Any) -> Iterator[tuple[str, nn.Module]]:
    """(name, piece) of every module of ``network``: its adapters, body, head and decoder."""
    for m in network.blocks:
        for source, adapter in m.adapters.items():
            yield f"module {m.index}'s adapter from {source}", adapter
        yield f"module {m.index}'s body", m.body
        for part in ("head", "decoder"):
            piece = getattr(m, part, None)
            if isinstance(piece, nn.Module):
                yield f"module {m.index}'s {part}", piece


def compile_pieces(named: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Put each (name, piece) under ``torch.compile`` in place (compiled at its first call);
    returns the names. A piece already compiled is left as it is."""
    names = []
    for name, piece in named:
        if not isinstance(piece.__dict__.get("forward"), CompiledForward):
            piece.forward = CompiledForward(piece, name)
        names.append(name)
    return names


def compile_network(network: Any) -> list[str]:
    """Every piece of ``network`` (:func:`pieces`) under ``torch.compile``; returns their names."""
    return compile_pieces(pieces(network))


def is_compiled(network: Any) -> bool:
    """Whether :func:`compile_network` put ``network``'s pieces under ``torch.compile``."""
    return any(isinstance(piece.__dict__.get("forward"), CompiledForward) for _, piece in pieces(network))


def uncompiled_copy(network: Any) -> Any:
    """A deep copy of ``network`` with every piece's plain forward (for counting and meters that
    watch every operation, which compiled code would hide)."""
    twin = copy.deepcopy(network)
    for _, piece in pieces(twin):
        piece.__dict__.pop("forward", None)
    return twin


__all__ = ["CompiledForward", "compile_pieces", "compile_network", "is_compiled", "pieces", "uncompiled_copy"]
