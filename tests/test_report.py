"""Plotted reports: every figure is a real, non-empty PNG for runs trained in the test, and the
Markdown page embeds them beside the result table."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from PIL import Image

from contsup.cli import main
from contsup.tools.plotting import method_label, method_labels


def check_png(path) -> None:
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 600 and image.size[1] >= 400
        low, high = image.convert("L").getextrema()
        assert low < 100 and high > 200  # drawn on, not blank


def test_report_writes_every_figure_and_the_page(finished_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(finished_runs), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (out / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    names = {"error_vs_k.png", "error_vs_memory.png", "local_accuracy.png"}
    assert names <= set(embedded)
    assert sum(e.startswith("curves/") for e in embedded) == 4  # one per configuration
    for rel in embedded:
        check_png(out / rel)
    assert "| test error % |" in page and "ContSup R1E, K=4" in page and "DGL, K=2" in page
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(embedded)


def test_report_includes_probes_and_weight_maps_when_present(finished_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(finished_runs / "none-k2", runs / "dgl")
    shutil.copytree(finished_runs / "R1E-k2", runs / "r1e")
    tiny = ["--epochs", "1", "--width", "4", "--train-size", "32"]
    assert main(["probe", str(runs / "dgl"), str(runs / "r1e"), "-o", str(tmp_path / "p.png"), *tiny]) == 0
    assert main(["weights", str(runs / "r1e")]) == 0
    out = tmp_path / "report"
    assert main(["report", str(runs), "-o", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "](information.png)" in page and "## Context weights" in page
    check_png(out / "information.png")
    (weights,) = (out / "weights").glob("*.png")
    check_png(weights)


def test_report_on_nothing_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_method_labels():
    assert method_label({"context.use": "none", "objective.use": "cross_entropy"}) == "DGL"
    assert method_label({"context.use": "R1E", "objective.use": "supcon"}) == "ContSup R1E · supcon"
    assert method_label({"context.use": "none", "decoder.use": "infopro"}) == "DGL + infopro"
    assert method_label({"run.mode": "e2e", "context.use": "none"}) == "E2E"
    assert method_label({"context.use": "contsup", "context.input": True, "context.recent": 1, "context.intermediate": 1}) == "ContSup M1R1E"
    assert method_label({"context.use": "contsup", "context.input": False, "context.recent": 0}) == "DGL"
    hybrid = '[{"range": [1, 4], "context": {"use": "none"}}, {"range": [5, 16], "context": {"use": "R1E"}}]'
    assert method_label({"context.use": "R1E", "modules": hybrid}) == "hybrid DGL[1-4]+R1E[5-16]"
    configs = [
        {"context.use": "R1E", "optimizer.lr": 0.1, "partition.modules": 4},
        {"context.use": "R1E", "optimizer.lr": 0.1, "partition.modules": 16},
        {"context.use": "R1E", "optimizer.lr": 0.2, "partition.modules": 4},
        {"context.use": "none", "optimizer.lr": 0.1, "partition.modules": 4},
    ]
    labels = sorted(set(method_labels(configs).values()))
    assert labels == ["ContSup R1E (optimizer.lr=0.1)", "ContSup R1E (optimizer.lr=0.2)", "DGL"]


def test_a_method_has_one_colour_in_every_figure():
    from contsup.tools.plotting import colours
    from contsup.tools.probe import label_method

    report = colours(["DGL", "ContSup R1E", "E2E", "hybrid DGL[1-4]+R1E[5-16]", "ContSup R1E · supcon"])
    probe = colours(["runs/a: DGL, K=16", "runs/b: ContSup R1E, K=16"], method=label_method)
    assert probe["runs/a: DGL, K=16"] == report["DGL"] and probe["runs/b: ContSup R1E, K=16"] == report["ContSup R1E"]
    assert len(set(report.values())) == len(report)  # never two methods in one colour
    assert report["hybrid DGL[1-4]+R1E[5-16]"] not in colours(["ContSup E"]).values()  # nor a paper method's
    one_method = colours(["a: DGL, K=4", "b: DGL, K=16"], method=label_method)
    assert len(set(one_method.values())) == 2  # the same method at two K: told apart by colour


def _saved_figures(monkeypatch):
    """Every figure the report saves, recorded as (file name, data points drawn)."""
    import contsup.tools.report_figures as report  # where the figures are drawn and saved

    saved = []
    real = report.save_png

    def record(fig, path):
        points = 0
        for ax in fig.axes:
            points += sum(len(line.get_xdata()) for line in ax.lines)
            points += len(ax.patches)
        saved.append((Path(path).name, points))
        return real(fig, path)

    monkeypatch.setattr(report, "save_png", record)
    return saved


def test_report_on_an_ordinary_folder_of_mixed_runs(mixed_runs, tmp_path, capsys):
    """Runs that differ in dataset, epochs, K, mode and context: short file names, every figure
    written and embedded, the full labels in report.md, memory from the plan."""
    out = tmp_path / "report"
    assert main(["report", str(mixed_runs / "runs"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    page = (out / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(embedded)
    assert {"error_by_configuration.png", "error_vs_memory.png", "local_accuracy.png"} <= set(embedded)
    assert "error_vs_k.png" not in embedded  # no method trained at two values of K
    assert "no method was trained greedily at two values of K" in page
    for rel in embedded:
        assert len(Path(rel).name) <= 64, rel
        check_png(out / rel)
    # one curve figure per configuration trained two epochs or more; the one-epoch ones as tables
    assert sum(e.startswith("curves/") for e in embedded) == 3
    assert page.count("## After one epoch: ") == 2
    # the full labels, which tell the two R1E digits runs and the imagefolder run apart
    assert "ContSup R1E (data.use=digits, run.epochs=1), K=4" in page
    assert "ContSup R1E (data.use=digits, run.epochs=2), K=4" in page
    assert "ContSup R1E (data.use=imagefolder, run.epochs=2), K=2" in page
    assert "E2E, K=1" in page and "DGL, K=2" in page
    # the memory the figures use is the plan's: the largest module's bytes kept for backward
    from contsup.tools.plan import plan_data
    from contsup.config.recipe import load_recipe

    recipe = load_recipe(mixed_runs / "runs" / "digits-dgl" / "recipe.toml")
    plan = plan_data(recipe)["memory"]["largest_module_bytes"] / 2**20
    (row,) = [line for line in page.splitlines() if line.startswith("| DGL, K=2 |")]
    assert f"| {plan:.1f} |" in row
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_no_figure_of_a_report_is_a_single_dot(mixed_runs, tmp_path, monkeypatch, capsys):
    saved = _saved_figures(monkeypatch)
    assert main(["report", str(mixed_runs / "runs"), "-o", str(tmp_path / "all")]) == 0
    assert saved and all(points >= 2 for _, points in saved), saved
    saved.clear()
    # one run of one epoch: a table, no figure against K, memory, configuration or epochs
    assert main(["report", str(mixed_runs / "runs" / "digits-r1e-1epoch"), "-o", str(tmp_path / "one")]) == 0
    page = (tmp_path / "one" / "report.md").read_text()
    assert [name for name, _ in saved] == ["local_accuracy.png"]  # four modules' heads: a line
    assert "## After one epoch: ContSup R1E, K=4" in page and "| 4 | " in page
    saved.clear()
    # end to end, one epoch: one head, so not even the local accuracy is drawn
    assert main(["report", str(mixed_runs / "runs" / "digits-e2e"), "-o", str(tmp_path / "e2e")]) == 0
    assert saved == []
    assert "## After one epoch: E2E, K=1" in (tmp_path / "e2e" / "report.md").read_text()


def test_a_failing_report_leaves_the_output_as_it_was(finished_runs, tmp_path, monkeypatch, capsys):
    import errno

    import contsup.tools.report as report

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report\n")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "local_accuracy.png"))

    monkeypatch.setattr(report, "plot_local_accuracy", full_disk)
    assert main(["report", str(finished_runs), "-o", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*")] == ["report.md"]
    assert (out / "report.md").read_text() == "an earlier report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left


def test_a_new_report_replaces_the_figures_of_an_earlier_one(finished_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(finished_runs), "-o", str(out)]) == 0
    assert len(list((out / "curves").glob("*.png"))) == 4
    assert main(["report", str(finished_runs / "R1E-k2"), "-o", str(out)]) == 0
    page = (out / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(embedded)


def test_legends_stay_inside_the_figure():
    from contsup.tools.plotting import legend_below, new_figure

    fig, ax = new_figure(7.0, 4.5)
    for i in range(6):
        ax.plot([1, 2], [i, i + 1], label=f"ContSup R1E (data.use=imagefolder, data.root=/a/very/long/path/{i}, run.epochs={i})")
    legend_below(fig, ax)
    fig.draw_without_rendering()  # lays the figure out as saving it does
    (legend,) = fig.legends
    box, page = legend.get_window_extent(), fig.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0
    assert box.y1 <= ax.get_window_extent().y0  # below the axes, hiding no point


def test_telling_labels_name_the_fewest_keys():
    from contsup.tools.plotting import telling_keys

    configs = [
        {"data.use": "digits", "backbone.use": "r20", "run.epochs": 1},
        {"data.use": "digits", "backbone.use": "r20", "run.epochs": 3},
        {"data.use": "digits", "backbone.use": "r32", "run.epochs": 2},
        {"data.use": "imagefolder", "backbone.use": "r20", "run.epochs": 2},
    ]
    assert telling_keys(configs) == ["data.use", "run.epochs"]
