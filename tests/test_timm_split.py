"""timm's families split into minimal units and a head: the units in order, then the head, are
the timm model itself (property-based, float64, eval mode); greedy training with K = 1 equals
end-to-end training step for step; timm's options reach the model; a model that cannot be split
is one line naming the families that can."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from contsup.config.recipe import loads_recipe
from contsup.errors import ContsupError
from contsup.training.loop import Trainer
from contsup.training.strategies import StepStats
from contsup.types import shape_kind
from contsup_timm import FAMILIES, TimmBackbone, TimmResNet, family_of, families_line
from contsup_timm.split import create, split_model

# Small members of every family: (model, options, smallest input side that works)
SMALL = {
    "vit": ("vit_tiny_patch16_224", {"embed_dim": 16, "num_heads": 2}),
    "deit": ("deit_tiny_distilled_patch16_224", {"embed_dim": 16, "num_heads": 2}),
    "deit3": ("deit3_small_patch16_224", {"embed_dim": 16, "num_heads": 2}),
    "convnext": ("convnext_atto", {"dims": (8, 16, 24, 32)}),
    "efficientnet": ("tinynet_e", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "regnet": ("regnetx_002", {}),
    "resnet": ("resnet10t", {}),
}


@st.composite
def small_models(draw):
    """A small model of some family with the options and input it is built for."""
    kind = draw(st.sampled_from(sorted(SMALL)))
    model, options = SMALL[kind]
    options = dict(options)
    sides = {"vit": [8, 16], "deit": [8, 16], "deit3": [8, 16], "convnext": [32, 64]}.get(kind, [16, 32])
    side = draw(st.sampled_from(sides))
    if kind in ("vit", "deit", "deit3"):
        options["patch_size"] = draw(st.sampled_from([2, 4]))
        options["depth"] = draw(st.integers(1, 3))
        if kind == "vit":
            variant = draw(st.sampled_from(["token", "avg", "registers"]))
            if variant == "avg":
                options["args"] = {"class_token": False, "global_pool": "avg"}
            elif variant == "registers":
                options["args"] = {"reg_tokens": 2}
    elif kind == "convnext":
        options["depths"] = tuple(draw(st.lists(st.integers(1, 2), min_size=4, max_size=4)))
    channels = draw(st.sampled_from([1, 3]))
    return model, options, (channels, side, side)


def build_pair(model: str, options: dict, shape, num_classes: int = 5, seed: int = 0):
    """timm's own model, built as the backbone builds it, and the backbone's split of it."""
    backbone = TimmBackbone(TimmBackbone.Options(model=model, **options))
    torch.manual_seed(seed)
    reference = create(model, backbone.model_args(shape, num_classes))
    return split_model(reference, model, families_line()), reference


def test_the_backbone_builds_timms_model_split():
    """``build`` is timm.create_model with the backbone's arguments, then the split: the same
    weights from the same seed."""
    backbone = TimmBackbone(TimmBackbone.Options(model="vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=2, num_heads=2))
    torch.manual_seed(3)
    parts = backbone.build((3, 16, 16), 4)
    torch.manual_seed(3)
    reference = timm.create_model("vit_tiny_patch16_224", **backbone.model_args((3, 16, 16), 4))
    ours = nn.ModuleList([*parts.units, parts.head])
    assert sorted(tuple(t.shape) for t in ours.state_dict().values()) == sorted(tuple(t.shape) for t in reference.state_dict().values())
    assert sorted(float(t.detach().sum()) for t in ours.parameters()) == sorted(float(t.detach().sum()) for t in reference.parameters())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_models(), st.integers(0, 2**16))
def test_the_units_then_the_head_are_the_timm_model(case, seed):
    """Float64, eval mode: every unit in order, then the head, gives the model's own output to the
    bit (the pieces run timm's own code in timm's order), and the pieces hold every parameter of
    the model exactly once."""
    model, options, shape = case
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        parts, reference = build_pair(model, options, shape, seed=seed)
        pieces = nn.ModuleList([*parts.units, parts.head]).eval()
        reference.eval()
        x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            h = x
            for unit in pieces[:-1]:
                h = unit(h)
            assert torch.equal(pieces[-1](h), reference(x))
        held = [id(p) for _, p in pieces.named_parameters(remove_duplicate=False)]
        assert sorted(held) == sorted(id(p) for p in reference.parameters())  # each of the model's, once
    finally:
        torch.set_default_dtype(previous)


def test_a_vit_splits_into_stem_blocks_and_head_with_token_shapes():
    parts, _ = build_pair("vit_tiny_patch16_224", {"patch_size": 2, "embed_dim": 16, "depth": 3, "num_heads": 2}, (1, 8, 8))
    assert len(parts.units) == 1 + 3  # the stem (patch embedding, class token, positions), then each block
    h = torch.zeros(2, 1, 8, 8)
    shapes = []
    for unit in parts.units:
        h = unit(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(17, 16)] * 4 and shape_kind(shapes[0]) == "tokens"  # 4x4 patches and the class token
    assert {name for name, _ in parts.units[0].named_parameters()} >= {"cls_token", "pos_embed", "patch_embed.proj.weight"}
    assert {name for name, _ in parts.head.named_children()} == {"norm", "fc_norm", "head_drop", "head"}


def test_a_convnext_splits_into_stem_downsamples_and_blocks():
    parts, model = build_pair("convnext_atto", {"depths": (1, 2, 1, 1), "dims": (8, 16, 24, 32)}, (3, 32, 32))
    stages = model.stages
    expected = [model.stem, *stages[0].blocks, stages[1].downsample, *stages[1].blocks,
                stages[2].downsample, *stages[2].blocks, stages[3].downsample, *stages[3].blocks]
    assert [id(u) for u in parts.units] == [id(u) for u in expected]


def test_timms_options_reach_the_model():
    """img_size follows the dataset for a ViT; patch size, width, depth, heads, MLP ratio and any
    other keyword (args) reach timm.create_model."""
    options = TimmBackbone.Options(
        model="vit_small_patch16_224", patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
        args={"class_token": False, "global_pool": "avg"},
    )
    args = TimmBackbone(options).model_args((3, 16, 16), 7)
    assert args["img_size"] == (16, 16) and args["num_classes"] == 7 and args["in_chans"] == 3
    parts = TimmBackbone(options).build((3, 16, 16), 7)
    assert len(parts.units) == 3
    block = parts.units[1]
    assert block.attn.num_heads == 3 and block.mlp.fc1.out_features == 48
    assert parts.units[0](torch.zeros(1, 3, 16, 16)).shape == (1, 16, 24)  # 4x4 patches, no class token
    assert TimmBackbone(TimmBackbone.Options(model="vit_tiny_patch16_224", img_size=32)).model_args((3, 16, 16), 2)["img_size"] == 32


def test_options_a_model_does_not_take_are_one_line():
    backbone = TimmBackbone(TimmBackbone.Options(model="convnext_atto", embed_dim=16))
    with pytest.raises(ContsupError, match="timm could not build 'convnext_atto'.*embed_dim") as info:
        backbone.build((3, 32, 32), 10)
    assert "\n" not in str(info.value)
    with pytest.raises(ContsupError, match="backbone.args: num_classes cannot be set here"):
        TimmBackbone(TimmBackbone.Options(model="resnet18", args={"num_classes": 3})).build((3, 32, 32), 10)


def test_a_model_that_cannot_be_split_names_the_families_that_can():
    with pytest.raises(ValueError) as info:
        TimmBackbone.Options(model="swin_tiny_patch4_window7_224")
    message = str(info.value)
    assert "'swin_tiny_patch4_window7_224' is a timm model contsup cannot split into units" in message
    assert all(family in message for family in FAMILIES) and "\n" not in message
    with pytest.raises(ValueError, match="did you mean 'convnext_tiny'"):
        TimmBackbone.Options(model="convnext_tinny")
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        TimmResNet.Options(model="resnet181")


def test_every_family_is_reached_by_name(registries):
    for name, family in [("resnet50", "resnet"), ("vit_small_patch16_224", "vit"), ("deit_small_patch16_224", "vit"),
                         ("convnext_tiny", "convnext"), ("efficientnet_b0", "efficientnet"),
                         ("mobilenetv3_large_100", "mobilenetv3"), ("regnety_016", "regnet")]:
        resolved = registries.backbones.resolve(name)
        assert resolved.component is TimmBackbone and resolved.preset == {"model": name}
        assert family_of(name) == family
    assert TimmBackbone.resolve_name("cifar_resnet32") is None and TimmResNet.resolve_name("vit_small_patch16_224") is None


def test_list_backbones_names_the_families(capsys):
    from contsup.cli import main

    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("timm "))
    assert all(family in line for family in ("resnet", "vit", "deit", "convnext", "efficientnet", "mobilenetv3", "regnet"))
    assert "vit_tiny_patch16_224" in out and "patch_size = 0" in out


# -- K = 1 greedy training is end-to-end training ------------------------------------------------

RECIPE = """
[run]
seed = 0
epochs = 1
mode = "{mode}"
[data]
use = "synthetic"
shape = [3, {side}, {side}]
train_size = 12
test_size = 4
batch_size = 4
[backbone]
use = "{model}"
{options}
[partition]
modules = 1
[context]
use = "none"
[optimizer]
lr = 0.05
momentum = 0.9
"""

TRAINED = {
    "vit": ("vit_tiny_patch16_224", 'patch_size = 4\nembed_dim = 16\ndepth = 2\nnum_heads = 2', 8),
    "deit": ("deit_tiny_distilled_patch16_224", 'patch_size = 4\nembed_dim = 16\ndepth = 2\nnum_heads = 2', 8),
    "convnext": ("convnext_atto", "depths = [1, 1, 1, 1]\ndims = [8, 16, 24, 32]", 32),
    "efficientnet": ("tinynet_e", "", 16),
    "mobilenetv3": ("mobilenetv3_small_050", "", 16),
    "regnet": ("regnetx_002", "", 16),
}


@pytest.mark.filterwarnings("ignore:Seems like .optimizer.step")
@pytest.mark.parametrize("family", sorted(TRAINED))
def test_greedy_k1_equals_end_to_end_step_for_step(family, registries, tmp_path):
    model, options, side = TRAINED[family]
    trainers = []
    for mode in ("greedy", "e2e"):
        text = RECIPE.format(mode=mode, side=side, model=model, options=options)
        recipe = loads_recipe(text, registries, source=f"{family}_{mode}.toml")
        trainers.append(Trainer(recipe, tmp_path / mode, log=io.StringIO(), checkpoints=False))
    greedy, e2e = trainers
    steps = 0
    for (xg, yg), (xe, ye) in zip(greedy.train_loader, e2e.train_loader):
        assert torch.equal(xg, xe) and torch.equal(yg, ye)
        greedy.strategy.step(xg, yg, StepStats(1), lambda *_: None)
        e2e.strategy.step(xe, ye, StepStats(1), lambda *_: None)
        steps += 1
        for (name, g), (_, e) in zip(greedy.network.state_dict().items(), e2e.network.state_dict().items()):
            assert torch.equal(g, e), f"{family}, step {steps}: {name}"
    assert steps == 3


def test_an_input_the_model_cannot_take_is_one_line_at_validation(registries):
    """Validation builds the backbone on the meta device and runs it on the dataset's input there:
    a ConvNeXt (total stride 32) on 16x16 images is refused in one line, while a model whose
    features shrink to 1x1 at the dataset's size is accepted."""
    from contsup.errors import RecipeError

    text = RECIPE.format(mode="greedy", side=16, model="convnext_atto", options="")
    with pytest.raises(RecipeError, match=r"backbone: 'convnext_atto' cannot take a 3x16x16 input: ") as info:
        loads_recipe(text, registries, source="small.toml")
    assert len(info.value.lines) == 1
    loads_recipe(RECIPE.format(mode="greedy", side=16, model="tinynet_e", options=""), registries, source="ok.toml")


def test_token_and_convnext_backbones_pass_the_plugin_check():
    """contsup.testing.check_backbone, which plugin authors run, takes token units (B, N, D) as
    it takes feature maps: a ViT and a ConvNeXt from timm pass it."""
    from contsup.testing import check_backbone

    vit = TimmBackbone(TimmBackbone.Options(model="vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=2, num_heads=2))
    check_backbone(vit, input_shapes=[(3, 16, 16), (1, 8, 8)])
    convnext = TimmBackbone(TimmBackbone.Options(model="convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)))
    check_backbone(convnext, input_shapes=[(3, 32, 32)])
