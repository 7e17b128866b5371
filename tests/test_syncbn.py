"""Synchronised batch norm on the CPU: two ranks holding halves of a batch compute what plain
batch norm computes on the whole batch (forward, gradients, running statistics)."""

from __future__ import annotations

import datetime
import functools
import os

import pytest
import torch
from torch import nn

from contsup.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm

from ranks import run_ranks


def batch(shape=(6, 3, 5, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    dy = torch.randn(shape, generator=g)
    return x, dy


def reference(x: torch.Tensor, dy: torch.Tensor, steps: int = 2) -> dict:
    bn = nn.BatchNorm2d(x.shape[1], momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    for _ in range(steps):
        x1 = x.clone().requires_grad_()
        y = bn(x1)
        bn.zero_grad()
        (y * dy).sum().backward()
    return {"y": y.detach(), "dx": x1.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var, "n": bn.num_batches_tracked}


def halves_on_two_ranks(rank: int, folder: str) -> None:
    """Each rank normalises its half of the batch with SyncBatchNorm and saves what it got."""
    import torch.distributed as dist

    store = dist.FileStore(os.path.join(folder, "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    x, dy = batch()
    part = slice(0, 4) if rank == 0 else slice(4, 6)  # unequal halves: 4 and 2 images
    bn = SyncBatchNorm(x.shape[1], momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    for _ in range(2):
        x1 = x[part].clone().requires_grad_()
        y = bn(x1)
        bn.zero_grad()
        (y * dy[part]).sum().backward()
    torch.save({"y": y.detach(), "dx": x1.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                "mean": bn.running_mean, "var": bn.running_var, "n": bn.num_batches_tracked},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)


def test_two_ranks_compute_batch_norm_of_the_whole_batch(tmp_path):
    results = run_ranks(2, [], tmp_path, patch=functools.partial(halves_on_two_ranks, folder=str(tmp_path)))
    assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    x, dy = batch()
    ref = reference(x, dy)
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    close(torch.cat([r0["y"], r1["y"]]), ref["y"])
    close(torch.cat([r0["dx"], r1["dx"]]), ref["dx"])
    close(r0["dw"] + r1["dw"], ref["dw"])  # each rank's share; the gradient sum adds them
    close(r0["db"] + r1["db"], ref["db"])
    for r in (r0, r1):
        close(r["mean"], ref["mean"])
        close(r["var"], ref["var"])  # unbiased over the whole batch
        assert int(r["n"]) == int(ref["n"]) == 2


def test_without_a_process_group_it_is_plain_batch_norm():
    x, dy = batch((5, 3, 2, 2))
    plain, synced = nn.BatchNorm2d(3), SyncBatchNorm(3)
    synced.load_state_dict(plain.state_dict())
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    synced.eval(), plain.eval()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    weight, mean = net[1].weight, net[2][1].running_mean
    keys = list(net.state_dict())
    convert_sync_batchnorm(net)
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[2][1], SyncBatchNorm)
    assert net[1].weight is weight and net[2][1].running_mean is mean  # optimizers built before stay valid
    assert list(net.state_dict()) == keys


def test_a_one_dimensional_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SyncBatchNorm(3)(torch.zeros(3))
