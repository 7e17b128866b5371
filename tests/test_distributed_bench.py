"""Timings of distributed runs: the clock, distributed.json's totals and the summary lines."""

from __future__ import annotations

import time

import pytest

from contsup.distributed.timing import Clock, epoch_entry, overall, read_report, summary, write_report
from contsup.tools.distributed_bench import format_comparison


def test_the_clock_adds_time_per_activity_and_counts_waiting_for_data():
    clock = Clock()
    with clock.measure("compute"):
        time.sleep(0.02)
    items = list(clock.loading(iter([1, 2])))
    assert items == [1, 2]
    line = clock.snapshot(rank=1, wall_s=0.04, modules=[3, 4])
    assert line["rank"] == 1 and line["modules"] == [3, 4]
    assert line["compute_s"] >= 0.02 and line["load_s"] >= 0 and line["send_s"] == 0  # no upper bound: a busy machine sleeps longer
    assert line["utilisation"] == round(line["compute_s"] / 0.04, 4)
    clock.reset()
    assert clock.totals["compute"] == 0
    with clock.measure("send"):
        pass
    sent = clock.totals["send"]
    with clock.paused():  # what is measured inside is left out
        with clock.measure("send"), clock.measure("receive"):
            time.sleep(0.01)
    assert clock.totals["send"] == sent and clock.totals["receive"] == 0


def _report() -> dict:
    ranks = [
        {"rank": 0, "modules": [1, 2, 3], "compute_s": 3.0, "wall_s": 4.0},
        {"rank": 1, "modules": [4], "compute_s": 2.0, "wall_s": 4.0},
    ]
    return {"mode": "pipeline", "world_size": 2, "epochs": [epoch_entry(1, 100, 4.0, ranks), epoch_entry(2, 100, 1.0, ranks)]}


def test_distributed_json_holds_totals_over_the_epochs(tmp_path):
    report = _report()
    write_report(tmp_path, report)
    saved = read_report(tmp_path)
    assert saved["overall"] == overall(report) == {
        "images": 200, "train_time_s": 5.0, "images_per_s": 40.0, "utilisation": {"0": 0.75, "1": 0.5},
    }
    assert read_report(tmp_path / "elsewhere") is None


def test_summary_and_comparison_read_as_one_line_per_thing():
    assert summary(_report()) == (
        "pipeline parallel on 2 processes: 40 img/s; busy: rank 0 (modules 1-3) 75%, rank 1 (module 4) 50%"
    )
    result = {
        "recipe": "r.toml", "mode": "pipeline", "processes": 2, "cpus": 2, "device": "cpu", "speedup": 1.5,
        "runs": {
            "one process": {"images_per_s": 10.0, "utilisation": None, "stages": None},
            "2 processes (pipeline)": {"images_per_s": 15.0, "utilisation": {"0": 0.9, "1": 0.8}, "stages": [[1, 3], [4]]},
        },
    }
    assert format_comparison(result).splitlines() == [
        "r.toml: one process against 2 (pipeline), cpu, 2 CPUs",
        "run                              img/s  busy per rank",
        "one process                       10.0  -",
        "2 processes (pipeline)            15.0  rank 0 90%, rank 1 80% | modules 1-3, module 4",
        "speed-up: 1.50x with 2 processes",
    ]


def test_bench_on_a_pipeline_recipe_compares_one_process_with_two(write_recipe, tmp_path, capsys):
    """`contsup bench RECIPE --nproc 2`: both runs for real under torchrun, their throughput and
    each rank's utilisation in comparison.json."""
    import json

    from tiny import tiny_recipe_text

    from contsup.cli import main

    extra = '\n[distributed]\nmode = "pipeline"\nstages = [2, 2]\ntimeout_s = 60\n'
    path = write_recipe(tiny_recipe_text(tmp_path / "unused", epochs=1, modules=4, extra=extra), "pipe.toml")
    assert main(["bench", str(path), "--nproc", "1"]) == 2
    assert "--nproc must be >= 2 for a distributed recipe, got 1" in capsys.readouterr().err
    out = tmp_path / "bench"
    assert main(["bench", str(path), "--nproc", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    one, two = result["runs"]["one process"], result["runs"]["2 processes (pipeline)"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["images_per_s"] > 0 and two["images_per_s"] > 0
    assert result["speedup"] == two["images_per_s"] / one["images_per_s"]
    assert sorted(two["utilisation"]) == ["0", "1"] and all(0 < u <= 1 for u in two["utilisation"].values())
    assert two["stages"] == [[1, 2], [3, 4]]
    assert "2 processes (pipeline)" in printed and f"wrote {out / 'comparison.json'}" in printed
    assert main(["bench", str(path), "--nproc", "2", "--out", str(out)]) == 2  # never over an earlier result
    assert "is not empty" in capsys.readouterr().err


def _schedules_script():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("pipeline_schedules", ROOT / "benchmarks" / "pipeline_schedules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_saved_activation_meter_counts_what_backward_keeps_and_leaves_parameters_out():
    import torch

    bench = _schedules_script()
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    with bench.SavedActivations() as saved:
        out = torch.relu(layer(x))  # linear keeps x (8 x 4 floats), relu its output (8 x 4): the weight is left out
        assert saved.meter.current == 2 * 8 * 4 * 4
        out.sum().backward()
    assert saved.peak == 2 * 8 * 4 * 4 and saved.meter.current == 0


def test_the_schedules_table_and_target_read_from_the_rows():
    bench = _schedules_script()
    assert bench.equal_stages(16, 2) == [8, 8] and bench.equal_stages(5, 2) == [3, 2]

    def row(config, speed, peaks):
        times = {"compute_s": 1.0, "load_s": 0.0, "receive_s": 0.5, "send_s": 0.25, "communicate_s": 0.0, "wall_s": 2.0}
        ranks = [{"rank": k, "modules": [2 * k + 1, 2 * k + 2], "busy": 0.5, "saved_peak_bytes": p, **times}
                 for k, p in enumerate(peaks)]
        return {"config": config, "nproc": 2, "images_per_s": speed, "images_per_s_min": speed, "images_per_s_max": speed,
                "gflop_per_batch": 2.0, "compute_s_per_batch": 1.0, "gflops_computing": 2.0, "ranks": ranks}

    rows = [row("greedy", 30.0, [2**20, 2**20]), row("1f1b", 20.0, [3 * 2**20, 2**20])]
    runs = [{"config": c, "nproc": 2, "repeat": k, "images_per_s": v}
            for c, k, v in (("greedy", 0, 30.0), ("1f1b", 0, 20.0), ("greedy", 1, 28.0), ("1f1b", 1, 28.0))]
    t = bench.target(rows, runs)
    assert t == {"nproc": 2, "throughput_ratio": 1.5, "ratio_per_repeat": [1.5, 1.0], "greedy_saved_peak_bytes": 2**20,
                 "1f1b_saved_peak_bytes": 3 * 2**20, "met": True}
    assert not bench.target([row("greedy", 23.0, [1, 1]), row("1f1b", 20.0, [3, 1])])["met"]  # 1.15x
    result = {"recipe": "r.toml", "batch": 8, "modules": 4, "micro_batches": 2, "threads": 1, "steps": 2, "repeats": 1,
              "load_average_min": 1.0, "load_average_max": 2.0, "context": "R1E", "rows": rows, "target": t}
    lines = bench.format_table(result).splitlines()
    assert lines[2].split()[:6] == ["contsup", "pipeline", "(R1E)", "2", "30.0", "30.0-30.0"] and "1.50" in lines[2]
    assert lines[4].endswith("1.50x (per repeat: 1.50, 1.00), peak 1.0 against 3.0 MiB: met")
    assert lines[-1].split() == ["1F1B,", "end", "to", "end", "2", "1", "3-4", "0.500", "0.250", "0.125", "0.000", "0.125", "1.000"]
    assert bench.markdown_table(result).splitlines()[2] == "| contsup pipeline (R1E) | 2 | 30.0 | 30.0-30.0 | 1.50 | 2.0 | 1.00 | 2.0 | 50%, 50% | 1.0, 1.0 |"


def test_a_row_takes_the_median_run_whole_and_the_worst_peak():
    """Each rank's times come from one run (the one of median throughput), so that they add up;
    the saved peak is the largest of any run."""
    bench = _schedules_script()

    def run(repeat, speed, compute, peak):
        line = {"rank": 0, "modules": [1, 4], "compute_s": compute, "load_s": 0.0, "receive_s": 1.0, "send_s": 0.0,
                "communicate_s": 0.0, "wall_s": compute + 1.0, "busy": compute / (compute + 1.0), "saved_peak_bytes": peak,
                "rss_peak_bytes": 10}
        return {"config": "gpipe", "nproc": 1, "stages": [4], "repeat": repeat, "images_per_s": speed, "load_average": 1.0 + repeat,
                "ranks": [line]}

    result = {"steps": 2, "configs": ["gpipe"], "nproc": [1], "flops": {"gpipe": 4e9},
              "runs": [run(0, 10.0, 4.0, 100), run(1, 30.0, 2.0, 300), run(2, 20.0, 3.0, 200)]}
    done = bench.summarize(result)
    (row,) = done["rows"]
    assert (row["images_per_s"], row["images_per_s_min"], row["images_per_s_max"], row["median_repeat"]) == (20.0, 10.0, 30.0, 2)
    assert row["ranks"][0]["compute_s"] == 3.0 and row["ranks"][0]["wall_s"] == 4.0 and row["ranks"][0]["saved_peak_bytes"] == 300
    assert (row["gflop_per_batch"], row["compute_s_per_batch"], row["gflops_computing"]) == (4.0, 1.5, 4.0 / 1.5)
    assert (done["load_average_min"], done["load_average_max"], done["target"]) == (1.0, 3.0, None)


@pytest.mark.benchmark  # python -m pytest -m benchmark
def test_pipeline_schedules_trains_every_configuration_on_two_processes(tmp_path):
    """benchmarks/pipeline_schedules.py end to end on a tiny network: every configuration for real
    under torchrun, and every field of its JSON."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, small_recipe_text

    bench = _schedules_script()
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(small_recipe_text(train_size=16, batch_size=8, modules=4).replace("[3, 16, 16]", "[3, 8, 8]"))
    out, result_file = tmp_path / "out", tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_schedules.py"), str(recipe), "--nproc", "2",
           "--micro-batches", "2", "--steps", "2", "--warmup", "1", "--out", str(out), "--json", str(result_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(result_file.read_text())
    assert result == json.loads((out / "result.json").read_text())
    for key in ("command", "recipe", "machine", "torch", "backend", "device", "batch", "modules", "context", "micro_batches", "threads",
                "steps", "warmup", "repeats", "load_average_min", "load_average_max", "runs", "rows", "target"):
        assert key in result, key
    assert (result["batch"], result["modules"], result["context"], result["micro_batches"]) == (8, 4, "R1E", 2)
    assert [r["config"] for r in result["rows"]] == list(bench.CONFIGS) and len(result["runs"]) == len(bench.CONFIGS)
    work = {row["config"]: row["gflop_per_batch"] for row in result["rows"]}
    assert work["greedy"] > work["dgl"] > 0 and work["gpipe"] == work["1f1b"] == work["ddp"] > 0  # R1E adds its adapters
    for row in result["rows"]:
        assert row["nproc"] == 2 and row["stages"] == [2, 2] and row["images_per_s"] > 0, row
        assert row["gflops_computing"] == row["gflop_per_batch"] / row["compute_s_per_batch"] > 0
        assert [r["rank"] for r in row["ranks"]] == [0, 1]
        for r in row["ranks"]:
            assert set(bench.RANK_FIELDS) <= set(r), (row["config"], r)
            assert 0 < r["busy"] <= 1 and 0 < r["compute_s"] <= r["wall_s"] and r["saved_peak_bytes"] > 0, (row["config"], r)
        if row["config"] != "ddp":  # a pipeline: each rank its stage's modules
            assert [r["modules"] for r in row["ranks"]] == [[1, 2], [3, 4]], row["config"]
    target = result["target"]
    assert target["nproc"] == 2 and target["throughput_ratio"] > 0 and isinstance(target["met"], bool)
    table = done.stdout.splitlines()
    assert any(line.startswith("1F1B, end to end") for line in table) and any(line.startswith("target") for line in table)
    assert table[-1].startswith("DDP, end to end") and table[-1].split()[-1] != "0.000"  # the per-rank profile comes last
