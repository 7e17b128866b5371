"""The live saved-tensor meter: forward and backward, recomputation (activation checkpointing) included."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from contsup.model.network import build_network
from contsup.training.measure import LiveMemory, measure_live, measure_step
from contsup.training.strategies import CheckpointStrategy, EndToEndStrategy, StepStats, segment_sizes
from contsup.types import Costs

import attrs
import pytest

B, D = 8, 16
UNIT = B * D * 4  # one (B, D) float32 activation


def _chain_peak(layers: list[nn.Module], segments: int | None) -> LiveMemory:
    """A chain of bias-free linear layers (each saves only its input), summed, one backward;
    checkpointed over ``segments`` equal groups, or plain (None)."""
    meter = LiveMemory([p for layer in layers for p in layer.parameters()])
    x = torch.randn(B, D)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        h = x
        if segments is None:
            for layer in layers:
                h = layer(h)
        else:
            first = 0
            for size in segment_sizes(len(layers), segments):
                group = layers[first : first + size]
                first += size

                def run(h: torch.Tensor, group: list[nn.Module] = group) -> torch.Tensor:
                    with meter.recomputation():
                        for layer in group:
                            h = layer(h)
                    return h

                h = checkpoint(run, h, use_reentrant=False)
        loss = h.sum()
    loss.backward()
    return meter


def test_hand_computed_chain_of_linear_layers():
    layers = [nn.Linear(D, D, bias=False) for _ in range(6)]
    plain = _chain_peak(layers, None)
    # end-to-end: the six inputs x, h1..h5, all alive when backward starts, nothing recomputed
    assert (plain.peak, plain.peak_forward, plain.peak_backward) == (6 * UNIT, 6 * UNIT, 0)
    # two segments of three: the forward keeps x and h3; backward recomputes h4, h5 beside them
    two = _chain_peak(layers, 2)
    assert (two.peak, two.peak_forward, two.peak_backward) == (4 * UNIT, 2 * UNIT, 4 * UNIT)
    # three of two: x, h2, h4 kept; the last segment's recomputed h5 joins them
    three = _chain_peak(layers, 3)
    assert (three.peak, three.peak_forward, three.peak_backward) == (4 * UNIT, 3 * UNIT, 4 * UNIT)
    # one segment: x kept, then the whole chain recomputed in backward, as much as end-to-end
    one = _chain_peak(layers, 1)
    assert (one.peak, one.peak_forward, one.peak_backward) == (6 * UNIT, UNIT, 6 * UNIT)


def test_segment_sizes():
    assert segment_sizes(16, 4) == [4, 4, 4, 4]
    assert segment_sizes(17, 4) == [5, 4, 4, 4]
    with pytest.raises(ValueError):
        segment_sizes(3, 4)


def _plain(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    plain = attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))
    torch.manual_seed(0)
    return recipe, build_network(plain).network.train()


def test_end_to_end_live_peak_equals_the_saved_figure_and_checkpointing_is_below(small_recipe):
    recipe, network = _plain(small_recipe)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt, sched = recipe.optimizer.create(), recipe.schedule.create()
    e2e = EndToEndStrategy(network, opt, sched, 10, 10)
    saved = measure_step(e2e, x, y)
    live = measure_live(e2e, x, y)
    assert live["peak"] == live["forward"] == max(saved) > 0
    units = sum(len(m.body) for m in network.blocks)
    for s in (2, 4, units):
        ckpt = CheckpointStrategy(network, opt, sched, 10, 10, s)
        got = measure_live(ckpt, x, y)
        assert 0 < got["peak"] < live["peak"], s
        assert got["backward"] > got["forward"] > 0  # the recomputed segment is alive in backward
    assert ckpt.recompute_scope().__class__.__name__ == "nullcontext"  # the meter's scope is removed


@pytest.mark.filterwarnings("ignore:Seems like .optimizer.step")
def test_checkpointing_gives_end_to_end_gradients(small_recipe):
    recipe, network = _plain(small_recipe)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for strategy in (EndToEndStrategy, lambda *a: CheckpointStrategy(*a, segments=3)):
        s = strategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
        before = {k: v.clone() for k, v in network.state_dict().items()}
        s.optimizers[0].step = lambda: None  # keep the weights: compare the gradients alone
        s.step(x, y, StepStats(1), lambda m, l: None)
        grads.append([p.grad.clone() for p in s.optimizers[0].param_groups[0]["params"]])
        network.load_state_dict(before)  # batch-norm statistics back, for the same forward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpointing_refuses_a_network_with_context(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    network = build_network(recipe, costs=Costs.uniform(10)).network
    with pytest.raises(ValueError, match="without context"):
        CheckpointStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, 2)


def test_a_retained_graph_is_counted_only_while_it_lives(small_recipe):
    """BackLink retains module l's graph for module l+1's backward; its head's part is never
    walked again and must be let go with it, not stay counted (and alive) to the end of the step."""
    from contsup.training.strategies import GreedyStrategy
    from contsup.model.saved import module_tensors
    from contsup_methods import BackLink

    backlink = lambda units: BackLink(BackLink.Options(units=units))  # noqa: E731

    peaks = {}
    for units in (0, 1):
        recipe = small_recipe(modules=10, context="none", batch_size=8)  # one unit per module
        torch.manual_seed(0)
        network = build_network(recipe).network.train()
        strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, method=backlink(units))
        meter = LiveMemory(module_tensors(network))
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
        assert meter.current == 0 and not meter.live  # everything saved was released by the end
        peaks[units] = meter.peak
    units_kept = measure_step(
        GreedyStrategy(build_network(small_recipe(modules=10, context="none", batch_size=8)).network.train(),
                       recipe.optimizer.create(), recipe.schedule.create(), 10, 10),
        torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)),
    )
    # the link keeps at most one more module (here one unit) alive beside the one training
    assert peaks[0] < peaks[1] <= peaks[0] + max(units_kept)
