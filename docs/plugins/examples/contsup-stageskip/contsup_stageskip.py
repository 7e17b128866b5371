"""A contsup context selector that reads the network's layout: module l gets the input x and
the input of the module that opened its resolution stage (or the stage before it)."""

from __future__ import annotations

from typing import Literal

import attrs

from contsup import hookimpl
from contsup.options import option
from contsup.types import NetworkLayout, Source


def stage_entry_sources(module: int, layout: NetworkLayout, *, reach: str = "entry", input: bool = True) -> tuple[Source, ...]:
    """Sources of 1-based ``module``: x (if ``input``) and h_j^c, the input of module j+1, the
    first module of module l's stage (``reach = "entry"``) or of the stage before it
    (``"previous"``), when j+1 < l."""
    if module <= 1:
        return ()  # module 1 gets no context
    stage = layout.module(module).stage  # the backbone stage module l's input comes from
    if reach == "previous":
        stage -= 1  # stage 0 is x itself, the input of module 1
    entry = next((m.index for m in layout.modules if m.stage == stage), module)
    chosen = [Source.input()] if input else []
    if entry < module:
        chosen.append(Source.feature(entry - 1))  # h_{entry-1}^c is module entry's input
    return tuple(chosen)


class StageEntry:
    """The input x and the input of the module that opened module l's resolution stage."""

    name = "stage_entry"

    @attrs.frozen
    class Options:
        reach: Literal["entry", "previous"] = option(
            "entry", doc='"entry": the first module of l\'s own stage; "previous": of the stage before it'
        )
        input: bool = option(True, doc="also give every module (but the first) the raw input x")

    def __init__(self, options: "StageEntry.Options") -> None:
        self.options = options

    def sources(self, module: int, num_modules: int, layout: NetworkLayout) -> tuple[Source, ...]:
        o = self.options
        return stage_entry_sources(module, layout, reach=o.reach, input=o.input)


@hookimpl
def register_context_selectors(register):
    register(StageEntry)
