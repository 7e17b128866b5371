"""``[context] recompute`` / ``recompute_head``: the adapters (heads) run again in backward instead of
keeping their activations, with the same training as without and batch-norm statistics moved once."""

from __future__ import annotations

import contextlib

import attrs
import pytest
import torch
from torch import nn

from contsup.cli import main
from contsup_methods import BackLink
from contsup.tools.plan import plan_data
from contsup.config.recipe import RecipeError, loads_recipe
from contsup.config.schema import ContextOptions
from contsup.model.network import build_network
from contsup.model.recompute import recomputed
from contsup.model.saved import module_tensors
from contsup.training.measure import LiveMemory, measure_live
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats

from conftest import small_recipe_text

STEPS = 3


def assert_same(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """Equal to float64's last bits: the chunked recomputation runs the plain layer's operations,
    each batch norm's per-channel sums over a chunk of its channels, which some CPUs' vector
    kernels round differently in the last bit (2e-15 relative) than over all of them."""
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)
    else:
        assert torch.equal(a, b), name


def _train(recipe, options: ContextOptions, mode: str = "greedy") -> nn.Module:
    """The recipe's network after STEPS steps (float64, seeded batches) with ``options``; mode
    greedy, e2e, or backlink (greedy with BackLink over one unit: the step keeps graphs across
    modules and runs the backward passes in its own order)."""
    recipe = attrs.evolve(recipe, context_options=options)
    torch.manual_seed(0)
    network = build_network(recipe).network.double().train()
    make = EndToEndStrategy if mode == "e2e" else GreedyStrategy
    extra = {"method": BackLink(BackLink.Options(units=1))} if mode == "backlink" else {}
    strategy = make(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, **extra)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (8,), generator=g)
        strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
    return network


@pytest.mark.parametrize("mode", ["greedy", "e2e", "backlink"])
def test_recomputing_adapters_and_heads_trains_as_keeping_them(small_recipe, mode):
    recipe = small_recipe(modules=4, context="R1E", batch_size=8)  # official adapters: BN in M_E and M_R
    kept = _train(recipe, ContextOptions(), mode).state_dict()
    again = _train(recipe, ContextOptions(recompute=True, recompute_head=True), mode).state_dict()
    assert kept.keys() == again.keys()
    for name in kept:  # parameters, running statistics and batch counters alike
        assert_same(again[name], kept[name], name)
    counters = {n: int(v) for n, v in again.items() if n.endswith("num_batches_tracked")}
    assert any(".adapters." in n for n in counters) and any(".head." in n for n in counters)
    trained = {n: c for n, c in counters.items() if mode == "greedy" or ".head." not in n or n.startswith("blocks.3.")}
    assert set(trained.values()) == {STEPS}  # once per step, not once more for the recomputation


def test_recomputed_matches_the_plain_piece_with_dropout_and_batch_norm():
    torch.manual_seed(0)
    piece = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.Dropout(0.5), nn.ReLU())
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    piece = piece.double().train()
    results = []
    for recompute in (False, True):
        for p in piece.parameters():
            p.grad = None
        bn = piece[1]
        bn.reset_running_stats()
        torch.manual_seed(7)
        out = recomputed(piece, piece, x) if recompute else piece(x)
        torch.manual_seed(99)  # backward's recomputation must draw the forward's dropout mask anyway
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in piece.parameters()],
                        bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)))
    (o0, g0, m0, v0, n0), (o1, g1, m1, v1, n1) = results
    torch.testing.assert_close(o1, o0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m1, m0)  # momentum None: a second update would change the average
    torch.testing.assert_close(v1, v0)
    assert n0 == n1 == 1


def test_recomputed_is_the_plain_call_without_autograd():
    piece = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(5, 4)
    with torch.no_grad():
        out = recomputed(piece, piece, x)
    assert not out.requires_grad and int(piece[1].num_batches_tracked) == 1


def test_the_live_meter_shows_less_kept_with_recompute(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=8)
    peaks = {}
    for recompute in (False, True):
        r = attrs.evolve(recipe, context_options=ContextOptions(recompute=recompute))
        torch.manual_seed(0)
        network = build_network(r).network.train()
        strategy = GreedyStrategy(network, r.optimizer.create(), r.schedule.create(), 10, 10)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        peaks[recompute] = measure_live(strategy, x, y)
    plain, again = peaks[False], peaks[True]
    assert plain["backward"] == 0  # nothing recomputed: everything is saved in the forward
    assert again["forward"] < plain["forward"]  # the adapters keep nothing through the forward
    assert 0 < again["backward"]  # ... and the meter counts them again while backward recomputes them
    assert again["peak"] < plain["peak"]


def test_recipe_keys_validate_and_round_trip(registries):
    text = small_recipe_text(context='R1E"\nrecompute = true\nrecompute_head = true\n#')
    recipe = loads_recipe(text, registries, source="r.toml")
    assert recipe.context_options == ContextOptions(recompute=True, recompute_head=True)
    table = recipe.table()["context"]
    assert table["recompute"] is True and table["recompute_head"] is True and table["use"] == "R1E"
    network = build_network(recipe).network
    assert all(m.recompute and m.recompute_head for m in network.blocks)
    with pytest.raises(RecipeError, match=r"context\.recompute: expected a boolean|context\.recompute:"):
        loads_recipe(small_recipe_text(context='R1E"\nrecompute = "yes"\n#'), registries, source="r.toml")
    staged = small_recipe_text(extra='\n[[modules]]\nrange = [1, 4]\ncontext = { use = "R1E", recompute = true }\n')
    with pytest.raises(RecipeError, match=r"modules\[0\]\.context\.recompute: set it in the \[context\] section"):
        loads_recipe(staged, registries, source="r.toml")


def test_plan_shows_what_the_forward_keeps_with_recompute(write_recipe, capsys, registries):
    """With context.recompute the plan's training figure is what the forward keeps: the adapters'
    inputs, not their own activations, which stay in their column."""
    path = write_recipe(small_recipe_text(modules=3, context='R1E"\nrecompute = true\n#'))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "context.recompute: the context adapters keep only their inputs" in out
    assert "counts the adapters' inputs, not their own activations" in out
    lean = plan_data(loads_recipe(path.read_text(), registries, source=str(path)))
    kept = plan_data(loads_recipe(small_recipe_text(modules=3, context="R1E"), registries, source="kept.toml"))
    for a, b in zip(lean["modules"][1:], kept["modules"][1:]):  # modules 2 and 3 have adapters
        assert a["memory"]["adapter_bytes"] == b["memory"]["adapter_bytes"] > 0
        assert b["memory"]["bytes"] - b["memory"]["adapter_bytes"] <= a["memory"]["bytes"] < b["memory"]["bytes"]
    assert lean["memory"]["largest_module_bytes"] < kept["memory"]["largest_module_bytes"]


def _encoder_step(encoder: nn.Module, x: torch.Tensor, weights: torch.Tensor, recompute: bool, scope=None, bf16=False):
    """One forward and backward of ``encoder`` (the forward under bf16 autocast with ``bf16``, the
    backward outside it, as training does): its output, every gradient (the input's too), the
    running statistics and batch counters after it."""
    for p in encoder.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    kwargs = {} if scope is None else {"scope": scope}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = recomputed(encoder, encoder, x, **kwargs) if recompute else encoder(x)
        loss = (out * weights).sum()
    loss.backward()
    return out.detach(), [x.grad, *(p.grad for p in encoder.parameters())], [b.clone() for b in encoder.buffers()]


@pytest.mark.parametrize("pool_first", [False, True])
def test_the_encoder_recomputes_its_second_layer_in_channel_chunks(monkeypatch, pool_first):
    """M_E's own recomputation (a 40-channel second layer: chunks of 16, 16 and 8) gives the plain
    encoder's output, gradients (to the bit) and statistics, and keeps no more than its first
    layer and one chunk while backward runs."""
    from contsup import adapters
    from contsup.adapters import InputEncoder

    torch.manual_seed(0)
    encoder = InputEncoder((3, 16, 16), (40, 4, 4), hidden=12, pool_first=pool_first).double().train()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    weights = torch.randn(6, 40, 4, 4, dtype=torch.float64)
    chunks = []
    real_grad = torch.autograd.grad

    def counted_grad(outputs, inputs, *args, **kwargs):
        chunks.append(outputs.shape[1])
        return real_grad(outputs, inputs, *args, **kwargs)

    plain = _encoder_step(encoder, x, weights, recompute=False)
    monkeypatch.setattr(adapters.torch.autograd, "grad", counted_grad)
    meter = LiveMemory(module_tensors(encoder))
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        again = _encoder_step(encoder, x, weights, recompute=True, scope=meter.recomputation)
    assert chunks == [16, 16, 8, 12]  # three chunks of the second layer, then the first layer
    monkeypatch.undo()
    whole = LiveMemory(module_tensors(encoder))  # checkpointing the encoder whole, for comparison
    monkeypatch.setattr(encoder, "recompute_lean", lambda *inputs, scope: None)
    with torch.autograd.graph.saved_tensors_hooks(whole.pack, whole.unpack):
        _encoder_step(encoder, x, weights, recompute=True, scope=whole.recomputation)
    # the second layer's batch-norm input and ReLU output: 16 of its 40 channels alive, not 40
    channel = 8 * 6 * (4 * 4 if pool_first else 16 * 16)  # bytes of one channel at its resolution
    assert abs((whole.peak_backward - meter.peak_backward) - 2 * (40 - 16) * channel) < channel
    assert meter.peak_forward == whole.peak_forward  # the forward keeps the same: x (and its copies)
    assert torch.equal(again[0], plain[0])  # the forward is the plain one
    for a, b in zip(again[1], plain[1]):  # and so is every gradient, to float64's last bits
        assert_same(a, b)
    counters = [int(b) for b in again[2] if b.dtype == torch.long]
    assert counters == [2, 2]  # the forward's update only: backward left the statistics alone


def test_the_encoder_falls_back_to_checkpointing_with_other_batch_norms():
    """A swapped-in batch norm (as data-parallel SyncBatchNorm conversion makes) is recomputed whole
    by checkpointing, which runs the module's own forward."""
    from contsup.adapters import InputEncoder

    class Counting(nn.BatchNorm2d):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    torch.manual_seed(0)
    encoder = InputEncoder((3, 8, 8), (20, 4, 4), hidden=12).double().train()
    encoder.bn2 = Counting(20).double()
    x, weights = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 20, 4, 4, dtype=torch.float64)
    assert encoder.recompute_lean(x, scope=contextlib.nullcontext) is None
    Counting.calls = 0
    plain = _encoder_step(encoder, x, weights, recompute=False)
    again = _encoder_step(encoder, x, weights, recompute=True)
    assert Counting.calls == 3  # the plain step, then the forward and checkpointing's recomputation
    for a, b in zip(again[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_encoder_recomputes_under_the_forward_autocast():
    """Under bf16 autocast, backward's recomputation runs in bf16 as the forward did: the tensors it
    keeps are half the bytes of float32 ones, and the gradients are the plain bf16 encoder's, to the bit."""
    from contsup.adapters import InputEncoder

    torch.manual_seed(0)
    encoder = InputEncoder((3, 16, 16), (40, 4, 4), hidden=12).train()
    x, weights = torch.randn(8, 3, 16, 16), torch.randn(8, 40, 4, 4)
    peaks, grads = {}, {}
    for precision in ("bf16", "fp32"):
        bf16 = precision == "bf16"
        plain = _encoder_step(encoder, x, weights, recompute=False, bf16=bf16)
        meter = LiveMemory(module_tensors(encoder))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            again = _encoder_step(encoder, x, weights, recompute=True, scope=meter.recomputation, bf16=bf16)
        peaks[precision] = meter.peak_backward - meter.peak_forward  # what backward's recomputation adds
        grads[precision] = (plain[1][1:], again[1][1:])
    assert peaks["bf16"] == pytest.approx(peaks["fp32"] / 2, rel=0.05)
    for precision in ("bf16", "fp32"):
        for a, b in zip(*grads[precision]):
            assert torch.equal(a, b), precision


@pytest.mark.parametrize("recompute", [False, True])
def test_plan_names_recompute_among_the_remedies_for_heavy_adapters(write_recipe, capsys, recompute):
    """The official adapters outweigh a small module's body: the plan's warning offers the cheaper
    adapters and, unless it is on already, context.recompute (the same training)."""
    context = 'R1E"\nrecompute = true\n#' if recompute else "R1E"
    assert main(["plan", str(write_recipe(small_recipe_text(modules=4, context=context)))]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the context adapters")]
    assert len(warning) == 1 and 'context.encoder = "fast"' in warning[0]
    assert ("context.recompute = true" in warning[0]) is not recompute


def _head_step(head: nn.Module, h: torch.Tensor, weights: torch.Tensor, recompute: bool, meter: LiveMemory | None = None):
    """One forward and backward of ``head`` on ``h`` (through ``recomputed`` with ``recompute``,
    counted by ``meter`` when given): the input's and every parameter's gradient."""
    for p in head.parameters():
        p.grad = None
    h = h.detach().requires_grad_()
    hooks = torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack) if meter else contextlib.nullcontext()
    with hooks:
        out = recomputed(head, head, h, scope=meter.recomputation if meter else contextlib.nullcontext) if recompute else head(h)
        (out * weights).sum().backward()
    return [h.grad, *(p.grad for p in head.parameters())]


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_one_conv_head_recomputes_in_channel_chunks(channels_last):
    """recompute_head on the paper's 1c2f head (its conv 16 -> 32, stride 2): the plain gradients to
    the bit, and while backward runs one 16-channel chunk of the conv's batch-norm input and ReLU
    output is alive instead of all 32 channels."""
    from contsup.types import HeadSpec
    from contsup_objectives.heads import AuxClassifier

    torch.manual_seed(0)
    head = AuxClassifier(HeadSpec((16, 8, 8), (64, 2, 2), 10), out=10).train()
    h = torch.randn(6, 16, 8, 8)
    if channels_last:
        head, h = head.to(memory_format=torch.channels_last), h.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(6, 10)
    plain = _head_step(head, h, weights, recompute=False)
    lean = LiveMemory(module_tensors(head))
    again = _head_step(head, h, weights, recompute=True, meter=lean)
    for a, b in zip(again, plain):
        assert torch.equal(a, b)
    head.recompute_lean = lambda *inputs, scope: None  # checkpointing the head whole, for comparison
    whole = LiveMemory(module_tensors(head))
    _head_step(head, h, weights, recompute=True, meter=whole)
    channel = 4 * 6 * 4 * 4  # bytes of one channel of the conv's 4x4 output
    hidden = 4 * 6 * 128  # the fully connected layers' hidden activations: the whole head holds them meanwhile too
    saved = whole.peak_backward - lean.peak_backward
    assert 2 * (32 - 16) * channel <= saved <= 2 * (32 - 16) * channel + hidden + channel
    assert int(head.features[1].num_batches_tracked) == 3  # once per step: backward left the statistics alone


def test_other_heads_are_checkpointed_whole():
    from contsup.types import HeadSpec
    from contsup_objectives.heads import AuxClassifier

    spec = HeadSpec((16, 8, 8), (64, 2, 2), 10)
    x = torch.randn(2, 16, 8, 8)
    assert AuxClassifier(spec, out=10, variant="2c2f").recompute_lean(x, scope=contextlib.nullcontext) is None
    assert AuxClassifier(spec, out=10, variant="0c2f").recompute_lean(x, scope=contextlib.nullcontext) is None
    assert AuxClassifier(spec, out=10, variant="1c1f").eval().recompute_lean(x, scope=contextlib.nullcontext) is None


def test_a_head_with_a_frozen_layer_recomputes_and_leaves_it_without_gradient():
    from contsup.types import HeadSpec
    from contsup_objectives.heads import AuxClassifier

    torch.manual_seed(0)
    head = AuxClassifier(HeadSpec((16, 8, 8), (64, 2, 2), 10), out=10).train()
    head.classifier[0].weight.requires_grad_(False)
    h, weights = torch.randn(4, 16, 8, 8), torch.randn(4, 10)
    plain = _head_step(head, h, weights, recompute=False)
    again = _head_step(head, h, weights, recompute=True)
    assert head.classifier[0].weight.grad is None
    for a, b in zip(again, plain):
        assert (a is None and b is None) or torch.equal(a, b)
