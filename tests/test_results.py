"""Result tables: grouping by configuration, mean ± std over seeds, the paper's number beside
configurations it published, Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest

from contsup.core import tomlw
from contsup.cli import main
from contsup.tools.paper import cells, describe, matching_cells, method_differences, paper_schedule, schedule_differences
from contsup.tools.results import build_rows, csv_text, distinguishing_columns, find_runs, load_run, markdown

from conftest import ROOT, small_recipe_text


def fake_run(root, name, table, errors, finished=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(tomlw.dumps(table))
    lines = [
        {"epoch": i + 1, "test_error_pct": e, "peak_memory_bytes": 2**20 * (i + 1), "images_per_s": 100.0}
        for i, e in enumerate(errors)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if finished:
        (run / "model.pt").write_bytes(b"")
    return run


@pytest.fixture
def runs(tmp_path, small_recipe):
    base = small_recipe(context="none").table()
    r1e = small_recipe(context="R1E").table()
    for seed, err in enumerate([10.0, 12.0, 14.0]):
        fake_run(tmp_path, f"dgl-{seed}", {**base, "run": {**base["run"], "seed": seed}}, [50.0, err])
    for seed, err in enumerate([5.0, 7.0]):
        fake_run(tmp_path, f"r1e-{seed}", {**r1e, "run": {**r1e["run"], "seed": seed}}, [err])
    fake_run(tmp_path, "r1e-broken", r1e, [99.0], finished=False)
    return tmp_path


def test_rows_group_seeds_and_leave_out_unfinished_runs(runs, registries):
    columns, rows, unfinished = build_rows([load_run(d) for d in find_runs([runs])], registries)
    assert [r.run_dir.name for r in unfinished] == ["r1e-broken"]
    by_context = {row.config["context.use"]: row for row in rows}
    assert sorted(by_context["none"].errors) == [10.0, 12.0, 14.0]  # the final epoch counts
    assert by_context["none"].mean_std(by_context["none"].errors) == (12.0, 2.0)
    assert "context.use" in columns and "context.recent" not in columns and "run.seed" not in columns
    text = markdown(columns, rows)
    assert "| 12.00 ± 2.00 |" in text and "| 6.00 ± 1.41 |" in text
    table = list(csv.DictReader(io.StringIO(csv_text(columns, rows))))
    assert {r["context.use"]: float(r["test_error_mean"]) for r in table} == {"none": 12.0, "R1E": 6.0}


def test_results_command_prints_markdown_and_writes_csv(runs, tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    assert main(["results", str(runs), "--csv", str(out_csv), "--markdown", str(tmp_path / "t.md")]) == 0
    captured = capsys.readouterr()
    assert "test error %" in captured.out and "1 unfinished run(s) left out" in captured.err
    assert out_csv.read_text().startswith("data.use,")
    assert main(["results", str(tmp_path / "nothing-here")]) == 2


def test_distinguishing_columns_keep_only_what_tells_configurations_apart():
    configs = [
        {"data.use": "d", "context.use": "R1E", "context.recent": 1, "optimizer.lr": 0.1},
        {"data.use": "d", "context.use": "none", "context.recent": 0, "optimizer.lr": 0.1},
        {"data.use": "d", "context.use": "none", "context.recent": 0, "optimizer.lr": 0.2},
    ]
    assert distinguishing_columns(configs) == ["data.use", "context.use", "optimizer.lr"]


def paper_table(context, objective="supcon", modules=16, decoder=None, backbone="cifar_resnet32", dataset="cifar10", mode="greedy"):
    table = {
        "run": {"mode": mode},
        "data": {"use": dataset},
        "backbone": {"use": backbone},
        "partition": {"modules": modules},
        "context": {"use": context},
        "objective": {"use": objective},
    }
    if decoder:
        table["decoder"] = {"use": decoder}
    return table


def test_paper_cells_are_matched_by_configuration(registries):
    assert len(cells()) == 97 + 4  # Tables 2, 3 and 11; Table 9's BackLink cells
    assert describe(matching_cells(paper_table("R1E"), registries)) == "9.98 ± 0.18 (Tables 2, 11)"
    assert describe(matching_cells(paper_table("E", "cross_entropy", 2), registries)) == "8.04 ± 0.22 (Table 2)"
    spelled = paper_table("contsup")
    spelled["context"].update(input=True, recent=1, intermediate=0, dense=False)
    assert describe(matching_cells(spelled, registries)) == "9.98 ± 0.18 (Tables 2, 11)"
    assert describe(matching_cells(paper_table("none", "cross_entropy", 8, "infopro"), registries)) == "11.40 ± 0.18 (Table 2)"
    assert describe(matching_cells(paper_table("R1E", "supcon", 4, "infopro", "cifar_resnet110", "stl10"), registries)) == "20.53 ± 0.03 (Table 3)"
    assert describe(matching_cells(paper_table("none", "cross_entropy", 1, None, "cifar_resnet110", "svhn", "e2e"), registries)) == "3.07 ± 0.23 (Table 3)"
    assert matching_cells(paper_table("R1E", dataset="digits"), registries) == []
    assert describe(matching_cells(paper_table("none"), registries)).endswith("*")  # Table 11's R0 caveat


def test_backlink_runs_match_table_9_and_no_cell_without_the_link(registries):
    linked = paper_table("E", "cross_entropy", 2)
    linked["backlink"] = {"units": 2}
    assert describe(matching_cells(linked, registries)) == "6.88 (Table 9)"
    alone = paper_table("none", "cross_entropy", 4)
    alone["backlink"] = {"units": 2}
    assert describe(matching_cells(alone, registries)) == "7.55 (Table 9)"
    other = paper_table("E", "cross_entropy", 2)
    other["backlink"] = {"units": 1}  # another link length: the paper did not run it
    assert matching_cells(other, registries) == []
    plain = paper_table("E", "cross_entropy", 2)
    plain["backlink"] = {"units": 0}
    assert describe(matching_cells(plain, registries)) == "8.04 ± 0.22 (Table 2)"


def test_hybrid_schemes_are_summarised_by_range():
    from contsup.tools.results import stages_summary

    stages = [{"range": [1, 4], "context": {"use": "none"}}, {"range": [5, 16]}, {"range": [17, 20], "objective": {"use": "supcon"}}]
    assert stages_summary(stages, {"context.use": "R1E"}) == "1-4: none; 5-16: R1E; 17-20: R1E + supcon"


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("context", "encoder", "fast"),
        ("context", "encoder", "pooled"),
        ("context", "shortcut", "paper"),  # the paper's text: not the network behind the numbers
        ("partition", "use", "memory_balanced"),
        ("objective", "head", "0c1f"),
        ("objective", "temperature", 0.5),
    ],
)
def test_another_method_gets_no_paper_number(registries, section, key, value):
    table = paper_table("R1E")
    assert describe(matching_cells(table, registries)) == "9.98 ± 0.18 (Tables 2, 11)"
    table[section] = {**table[section], key: value}
    assert method_differences(table) == [f"{section}.{key}"]
    assert matching_cells(table, registries) == []


def test_the_paper_setting_spelled_out_still_matches(registries):
    table = paper_table("R1E")
    table["partition"]["use"] = "uniform"
    table["context"].update(encoder="official", shortcut="official", input_once=True)
    table["objective"].update(head="1c2f", hidden=128, temperature=0.07, base_temperature=0.07, dim=128)
    assert describe(matching_cells(table, registries)) == "9.98 ± 0.18 (Tables 2, 11)"
    e2e = paper_table("none", "cross_entropy", 1, None, "cifar_resnet110", "svhn", "e2e")
    e2e["objective"]["head"] = "0c1f"  # end-to-end trains no local head: not part of its method
    assert describe(matching_cells(e2e, registries)) == "3.07 ± 0.23 (Table 3)"


def _with_schedule(table, dataset, **changes):
    for path, value in {**paper_schedule(dataset), **changes}.items():
        section, key = path.split(".")
        table.setdefault(section, {})[key] = value
    return table


def test_a_shorter_schedule_keeps_the_paper_number_marked_with_a_footnote(tmp_path, registries, capsys):
    paper = _with_schedule(paper_table("R1E"), "cifar10")
    short = _with_schedule(paper_table("E", "cross_entropy", 2), "cifar10", **{"run.epochs": 8, "data.batch_size": 128})
    assert schedule_differences(paper, "cifar10") == []
    assert schedule_differences(short, "cifar10") == ["run.epochs", "data.batch_size"]
    fake_run(tmp_path, "paper", paper, [10.0])
    fake_run(tmp_path, "short", short, [12.0])
    fast = _with_schedule(paper_table("R1E"), "cifar10", **{"run.epochs": 8})
    fast["context"]["encoder"] = "fast"
    fake_run(tmp_path, "fast", fast, [11.0])
    columns, rows, _ = build_rows([load_run(d) for d in find_runs([tmp_path])], registries)
    by_error = {row.errors[0]: row for row in rows}
    assert by_error[10.0].paper == "9.98 ± 0.18 (Tables 2, 11)" and by_error[10.0].schedule == ()
    assert by_error[12.0].paper == "8.04 ± 0.22 (Table 2) †"
    assert by_error[11.0].paper == "" and by_error[11.0].schedule == ()  # another method: nothing to compare
    md = tmp_path / "t.md"
    assert main(["results", str(tmp_path), "--markdown", str(md)]) == 0
    out, err = capsys.readouterr()
    assert "| 8.04 ± 0.22 (Table 2) † |" in out
    note = "† run with another schedule than the paper's (data.batch_size, run.epochs differ); its number is for the paper's own schedule"
    assert note in err.splitlines() and md.read_text().endswith(f"\n{note}\n")


PAPER_SWEEPS = sorted((ROOT / "recipes" / "paper").glob("*.sweep.toml"))


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=lambda p: p.name)
def test_the_shipped_paper_sweeps_match_their_cells_unmarked(path, registries):
    from contsup.config.reading import load_with_extends, set_path
    from contsup.config.validation import build_recipe
    from contsup.tools.sweep import load_sweep

    sweep = load_sweep(path)
    unmatched = set()
    for run in sweep.runs():
        if dict(run.settings).get("run.seed", 0) != 0:
            continue
        data = load_with_extends(run.recipe)
        for key, value in run.settings:
            set_path(data, key.split("."), value)
        table = build_recipe(data, str(run.recipe), registries).table()
        found = matching_cells(table, registries)
        assert method_differences(table) == [], run
        if found:
            assert schedule_differences(table, found[0].dataset) == [], run
        else:
            unmatched.add((table["context"]["use"], table["objective"]["use"]))
    assert unmatched <= {("none", "supcon")}  # DGL with supcon: run beside the tables, not in them
