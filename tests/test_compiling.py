"""``run.compile = true``: a module's pieces under torch.compile train as the uncompiled ones do
(within float tolerance), keep the network's state dict, fall back with one warning naming a piece
that cannot compile, and are refused with a method that splits module bodies."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from torch import nn

from contsup.config.recipe import RecipeError, loads_recipe
from contsup.model.network import build_network
from contsup.training.compiling import compile_network, is_compiled, uncompiled_copy
from contsup.training.strategies import GreedyStrategy, StepStats

from conftest import small_recipe_text


def _compile_works() -> str:
    """Why torch.compile cannot run here ("" where it can): it needs a C compiler on CPU."""
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        return "torch.compile on CPU needs a C compiler (cc, gcc or clang) and none is on PATH"
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as exc:  # noqa: BLE001 - whatever stops it, the tests cannot run
        return f"torch.compile does not work on this machine: {type(exc).__name__}: {exc}"
    return ""


WHY_NOT = _compile_works()
needs_compile = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "torch.compile works")


@needs_compile
@pytest.mark.slow
def test_compiled_greedy_training_matches_the_uncompiled_one(small_recipe):
    recipe = small_recipe(modules=2, context="R1E", batch_size=4, train_size=8)
    torch.manual_seed(0)
    plain = build_network(recipe).network.train()
    compiled = copy.deepcopy(plain)
    names = compile_network(compiled)
    assert "module 1's body" in names and "module 2's head" in names and is_compiled(compiled)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints are those of the plain network
    strategies = [GreedyStrategy(n, recipe.optimizer.create(), recipe.schedule.create(), 10, 10) for n in (plain, compiled)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        stats = [StepStats(2), StepStats(2)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s, st in zip(strategies, stats):
                s.step(x, y, st, lambda module, loss: None)
        assert not [w for w in caught if "run.compile" in str(w.message)]  # nothing fell back
        assert stats[1].loss == pytest.approx(stats[0].loss, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(plain.state_dict().items(), compiled.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    twin = uncompiled_copy(compiled)
    assert not is_compiled(twin) and is_compiled(compiled)




@needs_compile
def test_more_pieces_than_torchs_recompile_limit_each_run_compiled(monkeypatch):
    """torch.compile caches per code object, at most recompile_limit (8) entries: a network has
    dozens of pieces, and every one of them must run its own compiled graph (the pieces past the
    limit once ran uncompiled without a word)."""
    import functools

    from torch._dynamo.utils import counters

    from contsup.training import compiling

    monkeypatch.setattr(compiling.torch, "compile", functools.partial(torch.compile, backend="eager"))  # graphs, no codegen
    torch._dynamo.reset()
    counters.clear()
    pieces = [nn.Sequential(nn.Linear(n, 2), nn.ReLU()) for n in range(1, 13)]
    compiling.compile_pieces((f"piece {i}", p) for i, p in enumerate(pieces))
    for _ in range(2):
        for n, piece in enumerate(pieces, start=1):
            piece(torch.ones(3, n))
    assert counters["stats"]["unique_graphs"] == 12  # one static graph each, none recompiled
    torch._dynamo.reset()


def test_a_piece_that_cannot_compile_runs_uncompiled_with_one_warning(monkeypatch):
    from contsup.training import compiling

    def broken(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("backend failed\nmore detail")
        return run

    monkeypatch.setattr(compiling.torch, "compile", broken)
    piece = nn.Linear(3, 2)
    forward = compiling.CompiledForward(piece, "module 3's head")
    piece.forward = forward
    x = torch.ones(1, 3)
    with pytest.warns(UserWarning, match=r"run.compile: module 3's head cannot compile \(RuntimeError: backend failed\)") as caught:
        out = piece(x)
    torch.testing.assert_close(out, nn.functional.linear(x, piece.weight, piece.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        piece(x)  # once only
    assert len(caught) == 1


def test_compile_is_refused_with_a_method_that_splits_module_bodies(registries):
    text = small_recipe_text(modules=2, context="none", extra="\n[backlink]\nunits = 1\n").replace(
        'mode = "greedy"', 'mode = "greedy"\ncompile = true'
    )
    with pytest.raises(RecipeError) as caught:
        loads_recipe(text, registries, source="x.toml")
    assert any("run.compile" in p and "backlink" in p for p in caught.value.problems)
    assert loads_recipe(text.replace("compile = true", "compile = false"), registries, source="x.toml").run.compile is False
