"""benchmarks/gpu_check.sh: one line and exit 0 without CUDA; its pieces run on a CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == load_script().NO_CUDA + "\n"
    assert "no CUDA GPU" in done.stdout and not list(tmp_path.iterdir())  # nothing written


def test_the_pieces_run_on_a_cpu():
    gpu = load_script()
    assert "tests/test_memory.py::test_cuda_measurement_runs" in gpu.cuda_tests()
    rows = [gpu.measure(config, "cifar_resnet20", 2, 4, steps=1, warmup=0, device_name="cpu") for config in gpu.CONFIGS]
    assert [r["config"] for r in rows] == list(gpu.CONFIGS) and all(r["step_ms_median"] > 0 for r in rows)
    training = gpu.short_training(batches=2, batch=4, workers=0, device_name="cpu")
    assert training["images"] == 8 and training["images_per_s"] > 0 and training["bound_by"] in ("compute", "data loading")
    report = {"machine": "test", "torch": "x", "steps": 1, "warmup": 0, "seconds": 1.0, "memory_time": rows, "training": training,
              "tests": {"tests": [], "returncode": 0, "summary": "1 passed", "seconds": 0.0}}
    text = gpu.markdown(report)
    assert "| cifar_resnet20 | 4 | 2 | checkpointing S=K |" in text and "images/s" in text


def test_the_report_sets_compiled_rows_against_their_uncompiled_ones():
    gpu = load_script()
    assert {config for _, _, _, config in gpu.COMPILED} <= set(gpu.CONFIGS)
    row = {"backbone": "cifar_resnet32", "k": 4, "batch": 8, "max_memory_allocated_bytes": 2**20, "step_ms_median": 100.0}
    rows = [{**row, "config": "end-to-end"}, {**row, "config": "end-to-end compiled", "compiled": True, "first_step_s": 30.1,
                                            "step_ms_median": 80.0}]
    report = {"machine": "test", "torch": "x", "steps": 1, "warmup": 1, "seconds": 1.0, "memory_time": rows,
              "training": {"context": "R1E", "k": 4, "backbone": "b", "batch": 8, "batches": 1, "workers": 0, "images_per_s": 1.0,
                           "data_s": 0.1, "compute_s": 0.9, "data_share": 0.1, "bound_by": "compute"},
              "tests": {"tests": [], "returncode": 0, "summary": "skipped", "seconds": 0.0}}
    text = gpu.markdown(report)
    assert "end-to-end compiled: 80.0 ms against 100.0 ms uncompiled (1.250x faster); compilation 30 s" in text


def test_the_report_gives_the_distributed_rows_when_measured():
    gpu = load_script()
    bench = gpu._script("pipeline_schedules")
    ranks = [{"rank": 0, "busy": 0.9, "saved_peak_bytes": 2**20}, {"rank": 1, "busy": 0.8, "saved_peak_bytes": 2**21}]
    rows = [{"config": c, "nproc": 2, "images_per_s": v, "images_per_s_min": v, "images_per_s_max": v, "compute_s_per_batch": 1.0,
             "gflop_per_batch": 3.0, "gflops_computing": 3.0, "ranks": ranks} for c, v in (("greedy", 10.0), ("1f1b", 20.0))]
    d = {"machine": "cpu", "threads": 1, "steps": 4, "batch": 128, "modules": 16, "micro_batches": 4, "context": "R1E",
         "recipe": "r.toml", "repeats": 1, "load_average_min": 1.0, "load_average_max": 2.0, "rows": rows, "target": bench.target(rows)}
    d["table"], d["target_line"] = bench.markdown_table(d), bench.target_line(d)
    report = {"machine": "test", "torch": "x", "steps": 1, "warmup": 0, "seconds": 1.0, "memory_time": [],
              "training": {"context": "R1E", "k": 4, "backbone": "b", "batch": 4, "batches": 2, "workers": 0, "images_per_s": 1.0,
                           "data_s": 0.1, "compute_s": 0.9, "data_share": 0.1, "bound_by": "compute"},
              "tests": {"tests": [], "returncode": 0, "summary": "1 passed", "seconds": 0.0}, "distributed": d}
    text = gpu.markdown(report)
    assert "| contsup pipeline (R1E) | 2 | 10.0 | 10.0-10.0 | 0.50 | 3.0 | 1.00 | 3.0 | 90%, 80% | 1.0, 2.0 |" in text
    assert "0.50x, peak 2.0 against 2.0 MiB: not met." in text


@pytest.mark.benchmark  # python -m pytest -m benchmark
def test_the_distributed_piece_runs_on_a_cpu(tmp_path):
    """The rows the GPU check adds, here one configuration on a tiny network: run under torchrun,
    rendered into the report's table."""
    from conftest import small_recipe_text

    gpu = load_script()
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(small_recipe_text(train_size=16, batch_size=8, modules=4).replace("[3, 16, 16]", "[3, 8, 8]"))
    d = gpu.distributed_rows(steps=1, nproc=(2,), argv=[str(recipe), "--configs", "gpipe", "--micro-batches", "2"])
    assert [(r["config"], r["nproc"]) for r in d["rows"]] == [("gpipe", 2)] and d["rows"][0]["images_per_s"] > 0
    assert d["table"].splitlines()[2].startswith("| GPipe, end to end | 2 |") and d["target_line"] is None
