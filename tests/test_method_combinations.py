"""AugLocal heads and the training methods (BackLink, MAN, HPFF) combine with every context selector and every local objective
(cross-entropy, supervised contrastive, cross-entropy with InfoPro's decoder): each combination
builds, and one greedy step trains every module on finite losses."""

from __future__ import annotations

import itertools

import pytest
import torch

from contsup.config.recipe import loads_recipe
from contsup.model.components import training_method
from contsup.model.network import build_network
from contsup.training.strategies import GreedyStrategy, StepStats

from tiny import one_thread, tiny_recipe_text  # noqa: F401  (one_thread: autouse fixture)

CONTEXTS = ["none", "E", "R1E", "M1R1E", "all", "stage"]
OBJECTIVES = {
    "cross_entropy": '[objective]\nuse = "cross_entropy"\n',
    "supcon": '[objective]\nuse = "supcon"\n',
    "infopro": '[objective]\nuse = "cross_entropy"\n[decoder]\nuse = "infopro"\nixx_1 = 5.0\nixy_1 = 0.5\nixx_2 = 0.2\nixy_2 = 1.0\n',
}
METHODS = {
    "auglocal": ('head = "auglocal"\ndepth = 2\n', "[backlink]\nunits = 0"),
    "backlink": ("", "[backlink]\nunits = 1"),
    "both": ('head = "auglocal"\ndepth = 2\n', "[backlink]\nunits = 1"),
    "man": ("", "[man]"),
    "hpff": ("", "[hpff]"),
}
NO_OWN_LOSS = {"hpff": {1}}  # module 1 of HPFF learns through module 2's pair loss alone: its head does not


def _no_check(_module: int, _loss: torch.Tensor) -> None:
    pass


def recipe_text(tmp_path, context: str, objective: str, method: str) -> str:
    head, table = METHODS[method]
    section = OBJECTIVES[objective].replace('"\n', '"\n' + head, 1)  # the head keys go in [objective]
    extra = "\n" + section + f"\n{table}\n"
    return tiny_recipe_text(tmp_path, modules=4, context=context, extra=extra)


@pytest.mark.parametrize(("context", "objective", "method"), list(itertools.product(CONTEXTS, OBJECTIVES, METHODS)))
def test_builds_and_takes_a_step(registries, tmp_path, context, objective, method):
    recipe = loads_recipe(recipe_text(tmp_path, context, objective, method), registries, source="combo.toml")
    torch.manual_seed(0)
    built = build_network(recipe)
    network = built.network.train()
    heads = [m.head for m in list(network.blocks)[:-1]]
    if method in ("auglocal", "both"):
        assert all(any(hasattr(s, "sampled") for s in h.modules()) for h in heads)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10,
                              method=training_method(recipe))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # every class twice: the contrastive loss has positives
    stats = StepStats(len(network.blocks))
    strategy.step(x, y, stats, _no_check)
    losses = stats.mean_loss()
    assert all(loss is not None and torch.isfinite(torch.tensor(loss)) for loss in losses), losses
    for m in network.blocks:  # every module's body and head learnt from the step
        for part in ("body",) if m.index in NO_OWN_LOSS.get(method, ()) else ("body", "head"):
            prefix = f"blocks.{m.index - 1}.{part}."
            assert any(not torch.equal(before[n], p) for n, p in network.named_parameters() if n.startswith(prefix)), prefix
