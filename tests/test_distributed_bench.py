"""Timings of distributed runs: the clock, distributed.json's totals and the summary lines."""

from __future__ import annotations

import time

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
