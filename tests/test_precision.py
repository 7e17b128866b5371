"""Precision and device options on a CPU: bf16 autocast trains, fp16 is refused with one line
(its grad-scaler path still works), channels-last and deterministic mode take effect."""

from __future__ import annotations

import os

import pytest
import torch

from contsup.cli import main
from contsup.training.loop import Trainer
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats
from contsup.training.precision import Precision
from contsup.config.recipe import loads_recipe

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def trainer_for(registries, tmp_path, **run_keys):
    extra = "".join(f"{k} = {v}\n" for k, v in run_keys.items())
    text = tiny_recipe_text(tmp_path / "run", epochs=1).replace("[run]\n", "[run]\n" + extra)
    return Trainer(loads_recipe(text, registries, source="tiny.toml"), tmp_path / "run", log=open(os.devnull, "w"))


def test_bf16_autocast_trains_on_cpu(registries, tmp_path):
    trainer = trainer_for(registries, tmp_path, precision='"bf16"')
    dtypes = []
    for m in trainer.network.blocks:
        m.body.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    history = trainer.fit()
    assert set(dtypes) == {torch.bfloat16}  # training and evaluation ran under autocast
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # master weights stay fp32
    m = history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in m["train_loss"]) and 0 <= m["test_error_pct"] <= 100


def test_fp16_on_a_cpu_is_refused_with_one_line(write_recipe, tmp_path, capsys):
    path = write_recipe(tiny_recipe_text(tmp_path / "run"))
    assert main(["train", str(path), "--set", "run.precision=fp16", "--set", "run.device=cpu"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        'error: run.precision: "fp16" needs a CUDA device (this run is on cpu); use "bf16" or "fp32" here '
        "(--set run.precision=bf16)"
    ]
    assert not (tmp_path / "run").exists()  # refused before a run directory was made
    assert main(["validate", str(path), "--set", "run.precision=fp17"]) == 2
    assert "run.precision: 'fp17' is not allowed; did you mean 'fp16'?" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", [GreedyStrategy, EndToEndStrategy])
def test_fp16_steps_through_one_grad_scaler_per_optimizer(registries, tmp_path, strategy):
    """The scaler path that fp16 uses on CUDA, exercised on the CPU (torch allows it there)."""
    trainer = trainer_for(registries, tmp_path)
    r = trainer.recipe
    s = strategy(trainer.network, r.optimizer.create(), r.schedule.create(), 8, 4, precision=Precision("fp16", "cpu"))
    assert len(s.scalers) == len(s.optimizers) and all(sc.is_enabled() for sc in s.scalers)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    for x, y in trainer.train_loader:
        s.step(x, y, StepStats(trainer.network.num_modules), lambda *_: None)
    assert all(sc.get_scale() > 0 for sc in s.scalers)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    fp32 = Precision()
    assert not fp32.scaler().is_enabled()  # fp32's scalers pass straight through


def test_channels_last_keeps_weights_and_inputs_channels_last(registries, tmp_path):
    trainer = trainer_for(registries, tmp_path, channels_last="true")
    convs = [m.weight for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    seen = []
    trainer.network.blocks[0].body.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    assert trainer.fit()[-1]["test_error_pct"] <= 100
    assert seen and all(seen)


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_deterministic_turns_on_deterministic_algorithms(registries, tmp_path, restore_determinism):
    torch.use_deterministic_algorithms(False)
    trainer_for(registries, tmp_path, deterministic="true")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
