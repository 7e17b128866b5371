"""Local objectives: supcon_loss against a direct evaluation of its formula, its invariances and
stability; the auxiliary head variants' shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from contsup.testing import check_objective
from contsup.types import HeadSpec
from contsup_objectives import CrossEntropy, NoPositivePairs, SupCon, supcon_loss
from contsup_objectives.heads import VARIANTS, AuxClassifier


def loop_supcon(z, y, t, base_t):
    """The loss written as plain loops over anchors, positives and the denominator."""
    n = len(y)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        terms = [-math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives]
        per_anchor.append((t / base_t) * sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("n, classes, t, base_t", [(4, 2, 0.5, 0.5), (8, 3, 0.1, 0.07), (16, 5, 0.07, 0.07), (33, 10, 1.0, 0.5), (6, 6, 0.2, 0.2)])
def test_supcon_equals_a_double_loop(n, classes, t, base_t):
    g = torch.Generator().manual_seed(n * 7 + classes)
    z = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    if len(set(y.tolist())) == n:
        y[1] = y[0]
    assert float(supcon_loss(z, y, t, base_t)) == pytest.approx(loop_supcon(z, y, t, base_t), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 24), st.integers(1, 6), st.integers(0, 10_000))
def test_supcon_is_invariant_to_permuting_the_batch(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    y[-1] = y[0]
    perm = torch.randperm(n, generator=g)
    assert torch.allclose(supcon_loss(z, y), supcon_loss(z[perm], y[perm]), rtol=1e-10, atol=1e-12)


def test_supcon_falls_when_same_class_embeddings_are_pulled_together():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(4)
    z = F.normalize(torch.randn(16, 6, generator=g), dim=1)
    centres = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    before = float(supcon_loss(z, y))
    for alpha in (0.3, 0.6, 0.9):
        pulled = F.normalize((1 - alpha) * z + alpha * centres[y], dim=1)
        after = float(supcon_loss(pulled, y))
        assert after < before
        before = after


def test_supcon_gradients_are_finite_for_near_duplicates_and_large_logits():
    base = F.normalize(torch.randn(1, 16), dim=1)
    z = (base.repeat(8, 1) + 1e-7 * torch.randn(8, 16)).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    loss = supcon_loss(F.normalize(z, dim=1), y, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_supcon_without_any_positive_pair_is_an_error_not_nan():
    with pytest.raises(NoPositivePairs, match="no two samples in this batch of 3 share a label"):
        supcon_loss(F.normalize(torch.randn(3, 4), dim=1), torch.tensor([0, 1, 2]))


CIFAR = [((16, 32, 32), 2, 32), ((32, 16, 16), 2, 64), ((64, 8, 8), 1, 64)]


@pytest.mark.parametrize("shape, stride, width", CIFAR)
@pytest.mark.parametrize("variant", VARIANTS)
def test_head_variants_output_sizes(shape, stride, width, variant):
    spec = HeadSpec(shape, (64, 8, 8), 10)
    head = AuxClassifier(spec, out=10, variant=variant)
    assert head(torch.randn(3, *shape)).shape == (3, 10)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == int(variant[0]) and len(fcs) == int(variant[2])
    if convs:  # the paper's Table 6: stride 2 and doubled width until the last stage
        assert convs[0].stride == (stride, stride) and convs[0].out_channels == width
        assert fcs[0].in_features == width
    else:
        assert fcs[0].in_features == shape[0]
    assert all(f.out_features == 128 for f in fcs[:-1])


@pytest.mark.parametrize("objective", [CrossEntropy, SupCon], ids=["cross_entropy", "supcon"])
@pytest.mark.parametrize("head", ["1c2f", "0c1f", "2c2f", "auglocal"])
def test_builtin_objectives_keep_the_contract(objective, head):
    """Every head variant: a new head per call, (B, C, H, W) to what the loss takes, a finite
    scalar loss reaching h and the head only (AugLocal's copies, never the backbone's units)."""
    check_objective(objective(objective.Options(head=head)))


def test_objective_heads():
    spec = HeadSpec((16, 32, 32), (64, 8, 8), 7)
    ce = CrossEntropy(CrossEntropy.Options(head="0c2f"))
    assert ce.head(spec)(torch.randn(2, 16, 32, 32)).shape == (2, 7)
    sc = SupCon(SupCon.Options())
    z = sc.head(spec)(torch.randn(5, 16, 32, 32))
    assert z.shape == (5, 128) and torch.allclose(z.norm(dim=1), torch.ones(5))
    assert sc.predict(z) is None


def test_a_supcon_run_stops_cleanly_on_a_short_last_batch_and_drop_last_avoids_it(write_recipe, tmp_path, capsys):
    from conftest import small_recipe_text

    from contsup.cli import main
    from contsup.training.rundir import read_metrics

    torch.set_num_threads(1)
    extra = '\n[objective]\nuse = "supcon"\n'
    # 33 images in batches of 16: the third batch of every epoch holds a single image
    path = write_recipe(small_recipe_text(out_dir=str(tmp_path / "a"), train_size=33, modules=2, extra=extra))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: module 1 cannot train on step 3 of epoch 1: supcon: no two samples in this batch of 1 share a "
        "label, so the contrastive loss is undefined: every batch needs two samples of one class; it is the "
        "epoch's last, short batch (1 image): set data.drop_last = true to leave it out; no checkpoint was "
        "written yet"
    ]
    run = tmp_path / "b"
    assert main(["train", str(path), "--set", f'run.out_dir="{run}"', "--set", "data.drop_last=true"]) == 0
    assert len(read_metrics(run)) == 1


def test_drop_last_that_leaves_no_batch_is_refused_before_training(write_recipe, tmp_path, capsys):
    from conftest import small_recipe_text

    from contsup.cli import main

    path = write_recipe(small_recipe_text(out_dir=str(tmp_path / "run"), train_size=12, extra=""))
    assert main(["train", str(path), "--set", "data.drop_last=true"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: data.drop_last = true leaves no training batch: the training set has 12 images, fewer "
        f"than data.batch_size = 16; lower data.batch_size or set data.drop_last = false"
    ]
    assert not (tmp_path / "run").exists()


def test_the_head_option_offers_exactly_the_variants_the_heads_build():
    import typing

    from contsup_objectives import HeadVariant
    from contsup_objectives.heads import VARIANTS

    assert set(typing.get_args(HeadVariant)) == set(VARIANTS)
