"""Plotted reports: every figure is a real, non-empty PNG for runs trained in the test, and the
Markdown page embeds them beside the result table."""

from __future__ import annotations

import re
import shutil

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
