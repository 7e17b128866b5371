"""Token sequences (N, D) beside feature maps (C, H, W): the shape kinds of the layout, the token
grid read from shapes, context adapters for token modules (M_E a patch embedding, M_R a linear
map or the identity), heads on tokens, and the cost model's count for a vision transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contsup.adapters import (
    IdentityShortcut, OfficialTokenShortcut, TokenEncoder, TokenShortcut, official_adapter, paper_adapter, token_adapter,
)
from contsup.config.recipe import loads_recipe
from contsup.errors import ContsupError
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel, even_split
from contsup.model.network import build_network
from contsup.training.measure import measure_step
from contsup.training.strategies import GreedyStrategy, StepStats
from contsup.types import HeadSpec, NetworkLayout, Source, TokenGrid, shape_kind
from contsup_context import ContSup
from contsup_objectives import CrossEntropy, SupCon
from contsup_objectives.heads import VARIANTS, AuxClassifier
from contsup_objectives.token_heads import TransformerHead, attention_heads


def test_shape_kinds_and_the_layout():
    assert shape_kind((3, 8, 8)) == "map" and shape_kind((17, 64)) == "tokens"
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, D\)"):
        shape_kind((4,))
    layout = NetworkLayout.from_split((1, 8, 8), [(17, 64)] * 5, [2, 3])
    assert layout.unit_kinds == ("tokens",) * 5 and layout.kind(layout.input_shape) == "map"
    assert layout.module(1).input_kind == "map" and layout.module(1).output_kind == "tokens"
    assert layout.module(2).input_kind == "tokens" and layout.stages == ((0, 4),)


@pytest.mark.parametrize("tokens, image, grid", [
    ((17, 64), (1, 8, 8), TokenGrid(1, 4, 4, 2)),     # 2x2 patches and a class token
    ((197, 384), (3, 224, 224), TokenGrid(1, 14, 14, 16)),
    ((198, 192), (3, 224, 224), TokenGrid(2, 14, 14, 16)),  # DeiT's class and distillation tokens
    ((16, 32), (3, 16, 16), TokenGrid(0, 4, 4, 4)),   # no class token (average pooling)
    ((65, 8), (3, 8, 8), TokenGrid(1, 8, 8, 1)),
    ((7, 8), (3, 12, 8), TokenGrid(1, 3, 2, 4)),      # a non-square image
])
def test_the_token_grid_is_read_from_shapes(tokens, image, grid):
    assert TokenGrid.over_image(tokens, image) == grid
    if grid.rows == grid.cols:
        assert TokenGrid.square(tokens) == TokenGrid(grid.prefix, grid.rows, grid.cols)


def test_no_grid_is_one_clear_error():
    with pytest.raises(ValueError, match="3 tokens are not patches of a 8x8 image after fewer prefix tokens"):
        TokenGrid.over_image((3, 4), (1, 8, 8))  # one 8x8 patch and two prefix tokens is no reading
    with pytest.raises(ValueError, match="3 tokens are not a square grid"):
        TokenGrid.square((3, 4))
    with pytest.raises(ContsupError, match=r"context: no patch embedding maps \(1, 8, 8\) to \(3, 4\) tokens"):
        TokenEncoder((1, 8, 8), (3, 4))


def test_the_token_encoder_is_a_patch_embedding_and_prefix_tokens_get_the_mean():
    torch.manual_seed(0)
    encoder = TokenEncoder((3, 8, 8), (18, 16))  # 16 patches of 2x2, two prefix tokens
    assert encoder.proj.kernel_size == (2, 2) and encoder.proj.stride == (2, 2) and encoder.prefix == 2
    x = torch.randn(2, 3, 8, 8)
    out = encoder(x)
    assert out.shape == (2, 18, 16)
    patches = encoder.proj(x).flatten(2).transpose(1, 2)
    assert torch.equal(out[:, 2:], patches)
    assert torch.allclose(out[:, 0], patches.mean(dim=1)) and torch.equal(out[:, 0], out[:, 1])
    assert TokenEncoder((3, 8, 8), (16, 16))(x).shape == (2, 16, 16)  # no prefix tokens


def test_token_shortcuts_map_each_token_and_refuse_other_pairs():
    torch.manual_seed(0)
    h = torch.randn(2, 17, 32)
    paper = TokenShortcut((17, 32), (17, 64))
    assert torch.equal(paper(h), h @ paper.proj.weight.T)
    official = OfficialTokenShortcut((17, 32), (17, 64))
    assert official(h).shape == (2, 17, 64) and [type(m) for m in official.children()] == [nn.Linear, nn.LayerNorm, nn.GELU]
    assert isinstance(token_adapter((17, 32), (17, 32), "identity"), IdentityShortcut)
    assert isinstance(token_adapter((17, 32), (17, 64), "identity"), TokenShortcut)  # shapes differ: the paper's
    with pytest.raises(ContsupError, match=r"M_R maps a token sequence to one of as many tokens; \(17, 32\) tokens to \(5, 32\) tokens"):
        TokenShortcut((17, 32), (5, 32))
    with pytest.raises(ContsupError, match=r"no adapter maps \(17, 32\) tokens to a feature map \(8, 4, 4\)"):
        paper_adapter(False, (17, 32), (8, 4, 4))


def test_the_fallback_and_the_selectors_give_token_adapters_for_token_modules():
    x_shape, h_shape = (1, 8, 8), (17, 64)
    assert isinstance(paper_adapter(True, x_shape, h_shape), TokenEncoder)
    assert isinstance(official_adapter(True, x_shape, h_shape), TokenEncoder)
    assert isinstance(paper_adapter(False, h_shape, h_shape), TokenShortcut)
    assert isinstance(official_adapter(False, h_shape, h_shape), OfficialTokenShortcut)
    for encoder in ("paper", "official", "pooled", "fast"):
        selector = ContSup(ContSup.Options(input=True, recent=1, encoder=encoder, shortcut="paper"))
        assert isinstance(selector.adapter(Source.input(), x_shape, h_shape), TokenEncoder)
        assert isinstance(selector.adapter(Source.feature(1), h_shape, h_shape), TokenShortcut)
    identity = ContSup(ContSup.Options(recent=1, shortcut="identity"))
    assert isinstance(identity.adapter(Source.feature(1), h_shape, h_shape), IdentityShortcut)
    assert isinstance(identity.adapter(Source.feature(1), (8, 4, 4), (8, 4, 4)), IdentityShortcut)  # maps too


# -- heads ---------------------------------------------------------------------------------------


def spec(shape, final=None, module=1):
    return HeadSpec(tuple(shape), tuple(final or shape), 10, module=module, num_modules=4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(17, 32), (16, 32)])
def test_every_head_variant_reads_tokens(variant, shape):
    torch.manual_seed(0)
    head = AuxClassifier(spec(shape), out=10, variant=variant)
    h = torch.randn(3, *shape)
    assert head(h).shape == (3, 10)
    if variant.startswith("0"):  # the normalised class token (or the mean token), then the fully connected layers
        pooled = head.pool(head.features(h))
        norm = head.features[0]
        expected = norm(h)[:, 0] if shape[0] == 17 else norm(h).mean(dim=1)
        assert torch.equal(pooled, expected)
    else:  # the convolutions run on the 4x4 grid of patch tokens
        assert head.features[1].in_channels == 32 and head.features[1].stride == (1, 1)


def test_the_conv_head_lays_patch_tokens_on_their_grid():
    head = AuxClassifier(spec((17, 8)), out=10, variant="1c1f")
    h = torch.arange(2 * 17 * 8, dtype=torch.float32).reshape(2, 17, 8)
    grid = head.features[0](h)
    assert grid.shape == (2, 8, 4, 4)
    assert torch.equal(grid[:, :, 1, 2], h[:, 1 + 1 * 4 + 2])  # patch (row 1, col 2) after the class token


def test_tokens_off_a_square_grid_are_one_line_for_a_conv_head_and_the_mean_token_otherwise():
    with pytest.raises(ContsupError, match=r"objective.head: a convolutional head lays tokens \(3, 8\) on a square grid"):
        AuxClassifier(spec((3, 8)), out=10, variant="1c2f")  # one patch and two prefix tokens is no reading
    head = AuxClassifier(spec((3, 8)), out=10, variant="0c2f")
    assert head(torch.randn(2, 3, 8)).shape == (2, 10) and not head.pool[0].first


def test_the_block_head_is_one_transformer_block():
    torch.manual_seed(0)
    head = TransformerHead(spec((17, 128)), out=10)
    assert head.block.attn.num_heads == 2 and head(torch.randn(2, 17, 128)).shape == (2, 10)
    assert [attention_heads(d) for d in (16, 64, 192, 384, 768, 100)] == [1, 1, 3, 6, 12, 1]
    assert CrossEntropy(CrossEntropy.Options(head="block")).head(spec((17, 64))).block is not None
    assert SupCon(SupCon.Options(head="block", dim=16)).head(spec((17, 64)))(torch.randn(2, 17, 64)).shape == (2, 16)
    with pytest.raises(ContsupError, match=r"objective.head = \"block\" is a transformer block for token features"):
        TransformerHead(spec((16, 8, 8)), out=10)


# -- a vision transformer through the network and the cost model --------------------------------

VIT = """
[run]
seed = 0
[data]
use = "synthetic"
shape = [3, 8, 8]
train_size = 8
test_size = 4
batch_size = 4
[backbone]
use = "vit_tiny_patch16_224"
patch_size = 2
embed_dim = 16
depth = 5
num_heads = 2
[partition]
use = "{partition}"
modules = 3
[context]
use = "{context}"
shortcut = "{shortcut}"
[objective]
head = "{head}"
"""


def vit_recipe(registries, context="R1E", partition="uniform", head="1c2f", shortcut="official"):
    text = VIT.format(context=context, partition=partition, head=head, shortcut=shortcut)
    return loads_recipe(text, registries, source="vit.toml")


@pytest.mark.parametrize("context, head", [("R1E", "block"), ("M1R2E", "0c2f"), ("all", "1c2f")])
def test_a_vit_trains_greedily_with_context(registries, context, head):
    """Every module of a ViT with context: token adapters from the layout's shapes, each source's
    output of the module input's shape, and a greedy step that trains every module."""
    recipe = vit_recipe(registries, context=context, head=head)
    torch.manual_seed(0)
    built = build_network(recipe)
    assert [p.input_shape for p in built.plans] == [(3, 8, 8), (17, 16), (17, 16)]
    assert built.layout.unit_kinds == ("tokens",) * 6
    m = built.network.blocks[2]
    assert type(m.adapters["x"]) is TokenEncoder and type(m.adapters["h1"]) is OfficialTokenShortcut
    strategy = GreedyStrategy(built.network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in built.network.blocks]
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    strategy.step(x, y, StepStats(3), lambda *_: None)
    for m, old in zip(built.network.blocks, before):
        for part in ("body", "head", "adapters"):
            moved = [not torch.equal(old[n], p) for n, p in m.named_parameters() if n.startswith(part)]
            assert not moved or any(moved), f"module {m.index}: its {part} did not train"
    assert built.network.eval()(x).shape == (4, 10)


def test_plan_and_profile_print_token_shapes_and_each_modules_memory(write_recipe, capsys):
    """contsup plan names a token sequence's shape as such (17x16 tokens) in both of its tables and
    counts every module's activation memory; contsup profile's unit table says the same."""
    from contsup.cli import main

    path = write_recipe(VIT.format(context="R1E", partition="uniform", head="block", shortcut="official"))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    modules = out.split("each module's input shape")[0].splitlines()
    assert sum(line.rstrip().endswith("17x16 tokens") for line in modules) == 3
    assert "17x16 tokens  x (M_E tokens" in out and "h1 (M_R tokens official" in out
    memory = out.split("activation memory kept for backward")[1].splitlines()
    assert [line.split()[0] for line in memory[3:6]] == ["1", "2", "3"]
    assert all(float(line.split()[1]) > 0 for line in memory[3:6])
    assert main(["profile", str(path)]) == 0
    assert "17x16 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("context, shortcut", [("R1E", "official"), ("M1R1E", "paper"), ("R2", "identity")])
def test_the_cost_model_counts_a_vit_from_shapes_as_a_real_step_saves(registries, context, shortcut):
    """Token shapes flow through the cost model: every piece counted from shapes equals the real
    count, and each module's prediction equals what a real greedy step saves, for the uniform and
    the memory-balanced split."""
    base = vit_recipe(registries, context=context, shortcut=shortcut)
    parts, shapes, info = recipe_parts(base)
    assert shapes == [(17, 16)] * 6
    k = base.partition.modules
    models = {m: CostModel(base, parts, shapes, info, method=m) for m in ("saved", "shapes")}
    pieces = {m: [*c.units, *c._heads.values(), *c._adapters.values()] for m, c in models.items()}
    tables = {m: (c.costs(k), c.plan_costs(even_split(c.n, k))) for m, c in models.items()}
    assert pieces["shapes"] == pieces["saved"] and tables["shapes"] == tables["saved"] and models["shapes"].notes == []
    for partition in ("uniform", "memory_balanced"):
        recipe = vit_recipe(registries, context=context, partition=partition, shortcut=shortcut)
        torch.manual_seed(0)
        built = build_network(recipe)
        strategy = GreedyStrategy(built.network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        predicted = models["shapes"].plan_costs([p.units for p in built.plans])
        assert [c.bytes for c in predicted] == measure_step(strategy, x, y), partition


def test_the_probe_reads_every_token_on_the_patch_grid():
    from contsup.tools.probe import ProbeNet, TokensOnGrid

    h = torch.randn(2, 18, 4)  # two prefix tokens, a 4x4 grid
    grid = TokensOnGrid((18, 4))(h)
    assert grid.shape == (2, 12, 4, 4)
    assert torch.equal(grid[:, :4, 1, 2], h[:, 2 + 1 * 4 + 2]) and torch.equal(grid[:, 4:8, 3, 0], h[:, 0])
    assert torch.equal(grid[:, 8:, 0, 0], h[:, 1])
    assert ProbeNet((18, 4), num_classes=10)(h).shape == (2, 10)


CONVNEXT = """
[run]
seed = 0
[data]
use = "synthetic"
shape = [3, 32, 32]
train_size = 8
test_size = 4
batch_size = 4
[backbone]
use = "convnext_atto"
depths = [1, 1, 1, 1]
dims = [8, 16, 24, 32]
[partition]
use = "{partition}"
modules = 3
[context]
use = "R1E"
"""


def test_a_convnext_takes_the_map_adapters_and_heads_and_is_counted_exactly(registries):
    """ConvNeXt's channels-first LayerNorm blocks with the paper's adapters and head: every piece
    counted from shapes equals the real count, and each module's prediction what a real greedy
    step saves."""
    from contsup.adapters import InputEncoder, OfficialShortcutAdapter

    base = loads_recipe(CONVNEXT.format(partition="uniform"), registries, source="convnext.toml")
    parts, shapes, info = recipe_parts(base)
    assert shapes[0] == (8, 8, 8) and shapes[-1] == (32, 1, 1) and len(shapes) == 8
    models = {m: CostModel(base, parts, shapes, info, method=m) for m in ("saved", "shapes")}
    pieces = {m: [*c.units, *c._heads.values(), *c._adapters.values()] for m, c in models.items()}
    assert pieces["shapes"] == pieces["saved"] and models["shapes"].notes == []
    for partition in ("uniform", "memory_balanced"):
        recipe = loads_recipe(CONVNEXT.format(partition=partition), registries, source="convnext.toml")
        torch.manual_seed(0)
        built = build_network(recipe)
        m = built.network.blocks[2]
        assert type(m.adapters["x"]) is InputEncoder and type(m.adapters["h1"]) is OfficialShortcutAdapter
        strategy = GreedyStrategy(built.network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        predicted = models["shapes"].plan_costs([p.units for p in built.plans])
        assert [c.bytes for c in predicted] == measure_step(strategy, x, y), partition
