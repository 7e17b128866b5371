"""Sweeps: every combination gets its own run directory, finished runs are skipped, bad sweeps
and bad combinations are reported before anything runs, --dry-run prints runnable commands."""

from __future__ import annotations

import shlex

import pytest

from contsup.cli import main
from contsup.errors import RecipeError
from contsup.tools.sweep import check_runs, describe_runs, load_sweep

from conftest import small_recipe_text


@pytest.fixture
def sweep_file(tmp_path):
    (tmp_path / "base.toml").write_text(small_recipe_text(train_size=16, modules=2))

    def write(axes: str, head: str = "") -> str:
        path = tmp_path / "s.sweep.toml"
        path.write_text(f'[sweep]\nrecipes = ["base.toml"]\nout_dir = "{tmp_path / "runs"}"\n{head}\n[axes]\n{axes}\n')
        return str(path)

    return write


def test_runs_cross_every_axis_into_distinct_directories(sweep_file):
    sweep = load_sweep(sweep_file('"partition.modules" = [1, 2, 4]\n"context.use" = ["none", "R1E"]\nrun.seed = [0, 1]'))
    runs = sweep.runs()
    assert len(runs) == 12 and len({r.run_dir for r in runs}) == 12
    assert runs[0].settings == (("partition.modules", 1), ("context.use", "none"), ("run.seed", 0))
    assert runs[0].run_dir.name == "partition.modules=1__context.use=none__run.seed=0"


def test_bad_sweep_files_are_reported_together(sweep_file):
    with pytest.raises(RecipeError) as err:
        load_sweep(sweep_file('"run.seed" = 3\n"run.out_dir" = ["x"]', head="outdir = 1"))
    problems = "\n".join(err.value.problems)
    assert "sweep.outdir: unknown key; did you mean 'out_dir'?" in problems
    assert 'axes."run.seed": expected a non-empty list of values' in problems
    assert "axes.run.out_dir: the sweep chooses each run's directory" in problems


def test_a_sweep_file_and_a_recipe_name_the_command_each_one_is_for(sweep_file, tmp_path, capsys):
    path = sweep_file('"context.use" = ["none", "E"]')
    for command in ("validate", "plan", "train"):
        assert main([command, path]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {path}: a sweep file ([sweep] and [axes]), not a recipe; check every combination with: contsup sweep {path} --dry-run\n"
    recipe = str(tmp_path / "base.toml")
    assert main(["sweep", recipe, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {recipe}: a recipe, not a sweep file (a sweep has [sweep] recipes = [...] and [axes]); "
        f"train it with: contsup train {recipe}\n"
    )
    assert not (tmp_path / "runs").exists()


def test_bad_combinations_are_found_before_running(sweep_file, registries):
    sweep = load_sweep(sweep_file('"partition.modules" = [2, 40]\n"context.use" = ["R1E", "R1X"]'))
    problems = check_runs(sweep, registries)
    assert any("[partition.modules=40] " in p and "partition.modules: 40 is more than" in p for p in problems)
    assert any('[context.use="R1X"] ' in p and "unknown context selector 'R1X'" in p for p in problems)
    assert main(["sweep", sweep.source.as_posix()]) == 2
    assert not (sweep.out_dir).exists()


def test_each_distinct_problem_is_one_line_naming_the_combinations_that_have_it(sweep_file, registries):
    path = sweep_file('"partition.modules" = [2, 40]\n"context.use" = ["R1E", "R1X", "E"]\nrun.seed = [0, 1]\noptimizer.momentum = [0.9, 0]')
    base = load_sweep(path).recipes[0]
    problems = check_runs(load_sweep(path), registries)
    assert problems == [
        f'{path}: [optimizer.momentum=0] {base}: optimizer.momentum: must be > 0 while nesterov = true, got 0.0; raise it, or set nesterov = false',
        f'{path}: [context.use="R1X"] {base}: context.use: unknown context selector \'R1X\'; did you mean \'R1\'? choices: '
        "R1, R1E, M1R1E, M2R1E, R0, R2E, R8E, E, ... (4 more)",  # the built-in stage selector is one (issue 16)
        f"{path}: [partition.modules=40] {base}: partition.modules: 40 is more than the 10 minimal units of backbone "
        "'cifar_resnet20'; use 1..10",
    ]
    # in every combination: said once, as such
    (problem,) = check_runs(load_sweep(sweep_file('"run.seed" = [0, 1]\n"optimizer.lr" = [-1]')), registries)
    assert problem.startswith(f"{path}: [all 2 combinations] {base}: optimizer.lr: must be > 0")


def test_combinations_no_axis_value_selects_are_each_named(sweep_file):
    sweep = load_sweep(sweep_file('"partition.modules" = [1, 2]\n"context.use" = ["E", "R1E"]\nrun.seed = [0, 1]'))
    runs = sweep.runs()
    assert describe_runs(sweep, [r for r in runs if r.settings[1][1] == "E"]) == 'context.use="E"'
    assert describe_runs(sweep, [r for r in runs if r.settings[2][1] == 1 and r.settings[0][1] == 2]) == (
        "partition.modules=2 run.seed=1"
    )
    assert describe_runs(sweep, [r for r in runs if r.settings[0][1] == 2 and r.settings[1][1] != "E"]) == (
        'partition.modules=2 context.use="R1E"'
    )
    assert describe_runs(sweep, runs[4:8]) == "partition.modules=2"
    assert describe_runs(sweep, runs[:3]) == (  # no product of axis values: each combination
        'partition.modules=1 context.use="E" run.seed=0; partition.modules=1 context.use="E" run.seed=1; '
        'partition.modules=1 context.use="R1E" run.seed=0'
    )
    assert describe_runs(sweep, runs) == "all 8 combinations"


def test_dry_run_prints_runnable_commands(sweep_file, capsys):
    path = sweep_file('"context.use" = ["none", "E"]')
    assert main(["sweep", path, "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2
    args = shlex.split(commands[1])
    assert args[:2] == ["contsup", "train"] and "context.use=\"E\"" in args
    assert main(args[1:]) == 0  # the printed command trains that run


def test_sweep_runs_everything_once_and_skips_finished_runs(sweep_file, capsys):
    path = sweep_file('"run.seed" = [0, 1]')
    assert main(["sweep", path]) == 0
    out = capsys.readouterr()
    assert "2/2 runs finished, 0 failed" in out.out
    sweep = load_sweep(path)
    assert all(r.finished for r in sweep.runs())
    assert main(["sweep", path]) == 0
    out = capsys.readouterr()
    assert "2 already finished" in out.err and "training" not in out.out


def test_ctrl_c_stops_the_sweep_and_a_rerun_resumes(sweep_file, capsys, monkeypatch):
    import os
    import signal

    from contsup.training.progress import Progress

    path = sweep_file('"data.train_size" = [64]\n"run.seed" = [0, 1]')  # 4 steps per run
    original, calls = Progress.update, {"n": 0}

    def update(self, step, losses):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C after the second step of the first run
            os.kill(os.getpid(), signal.SIGINT)
        original(self, step, losses)

    with monkeypatch.context() as m:
        m.setattr(Progress, "update", update)
        assert main(["sweep", path]) == 130
    out = capsys.readouterr().out
    assert "sweep stopped; run it again" in out
    first, second = load_sweep(path).runs()
    assert first.started and not first.finished and not second.started
    assert main(["sweep", path]) == 0
    out = capsys.readouterr().out
    assert f"resuming {first.run_dir}" in out and "2/2 runs finished, 0 failed" in out
