"""benchmarks/gpu_check.sh: one line and exit 0 without CUDA; its pieces run on a CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

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
