"""``contsup bench``: greedy against end-to-end in one process, written as JSON and Markdown."""

from __future__ import annotations

import json

import pytest

from contsup.cli import main

from conftest import small_recipe_text


def test_bench_writes_json_and_markdown(write_recipe, tmp_path, capsys):
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8))
    out = tmp_path / "result"
    assert main(["bench", str(path), "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy / e2e" in printed and "median step" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    g, e = data["greedy"], data["e2e"]
    assert len(g["step_ms"]) == len(e["step_ms"]) == 2
    assert len(g["saved_per_backward_bytes"]) == 4 and len(e["saved_per_backward_bytes"]) == 1
    assert g["saved_peak_bytes"] < e["saved_peak_bytes"]
    assert data["ratios"]["measured_over_predicted"] == 1.0  # the prediction is exact on CPU
    assert g["peak_rss_bytes"] > 0 and e["peak_rss_bytes"] > 0
    markdown = out.with_suffix(".md").read_text()
    assert "contsup bench" in markdown and "| saved for backward, peak (MiB) |" in markdown
    # checkpointing over S = 2, 3 (sqrt of ResNet-20's 11 units), 4 = K and 8 groups, the same meter
    ckpt = {c["segments"]: c for c in data["checkpointing"]}
    assert sorted(ckpt) == [2, 3, 4, 8] and data["checkpointing_best_segments"] in ckpt
    assert e["live_peak_bytes"] == e["saved_peak_bytes"] == e["peak_bytes"]  # plain end-to-end: the same figure
    for c in ckpt.values():
        assert 0 < c["peak_bytes"] < e["peak_bytes"] and len(c["step_ms"]) == 2
        assert c["live_peak_backward_bytes"] > c["live_peak_forward_bytes"]  # recomputation counted
    r = data["ratios"]
    assert r["checkpointing_k_memory"] == ckpt[4]["peak_bytes"] / e["peak_bytes"] < 1
    assert r["checkpointing_best_memory"] <= r["checkpointing_k_memory"]
    assert "| checkpointing S=K |" in markdown and f"| checkpointing best S={data['checkpointing_best_segments']} |" in markdown
    assert "checkpointing S=K" in printed and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the recipe's own network trained end-to-end keeps its adapters: more than the plain backbone
    recipe_side = tmp_path / "recipe"
    assert main(["bench", str(path), "--steps", "1", "--warmup", "0", "--baseline", "recipe", "--segments", "none", "--out", str(recipe_side)]) == 0
    assert not recipe_side.with_suffix(".png").exists()
    with_adapters = json.loads(recipe_side.with_suffix(".json").read_text())["e2e"]["saved_peak_bytes"]
    assert with_adapters > e["saved_peak_bytes"]


def test_bench_refuses_zero_steps(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    assert main(["bench", str(path), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps must be >= 1" in err


def test_bench_refuses_bad_segments(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    assert main(["bench", str(path), "--segments", "2,x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--segments must be" in err


def test_bench_reports_an_unwritable_output_in_one_line(write_recipe, tmp_path, capsys):
    path = write_recipe(small_recipe_text())
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", str(path), "--out", str(blocker / "sub" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create" in err


def test_bench_measures_variants_beside_the_recipe(write_recipe, tmp_path, capsys):
    """DGL, BackLink and AugLocal from one command: each variant is the recipe's greedy training
    with its overrides, on the same batches; the link's kept units and the deeper heads show."""
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8))
    out = tmp_path / "variants"
    args = ["bench", str(path), "--steps", "1", "--warmup", "0", "--segments", "none", "--out", str(out),
            "--variant", "DGL:context.use=none", "--variant", "BackLink:context.use=none;backlink.units=1",
            "--variant", "AugLocal:context.use=none;objective.head=auglocal"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    by = {v["label"]: v for v in data["variants"]}
    assert list(by) == ["DGL", "BackLink", "AugLocal"]
    assert (by["BackLink"]["backlink"], by["AugLocal"]["head"], by["DGL"]["context"]) == (1, "auglocal", "none")
    dgl = by["DGL"]["peak_bytes"]
    assert by["BackLink"]["peak_bytes"] > dgl  # module l's last unit stays alive for module l+1
    assert by["AugLocal"]["peak_bytes"] > dgl  # heads of copied units keep more than 1c2f
    assert data["greedy"]["peak_bytes"] > dgl  # R1E keeps its context
    for label in by:
        assert f"greedy K=4, {label}" in printed
    assert "| greedy K=4, BackLink |" in out.with_suffix(".md").read_text()


def test_bench_trains_the_recipes_backlink(write_recipe, tmp_path):
    plain, linked = (
        write_recipe(small_recipe_text(modules=4, context="none", batch_size=4, train_size=8, extra=extra), name)
        for name, extra in (("plain.toml", ""), ("linked.toml", "\n[backlink]\nunits = 1\n"))
    )
    peaks = []
    for path in (plain, linked):
        out = tmp_path / path.stem
        assert main(["bench", str(path), "--steps", "1", "--warmup", "0", "--segments", "none", "--out", str(out)]) == 0
        peaks.append(json.loads(out.with_suffix(".json").read_text())["greedy"]["peak_bytes"])
    assert peaks[1] > peaks[0]


def test_bench_refuses_a_variant_it_cannot_compare(write_recipe, capsys):
    path = write_recipe(small_recipe_text(modules=4, batch_size=4, train_size=8))
    assert main(["bench", str(path), "--variant", "no-label-or-keys"]) == 2
    assert main(["bench", str(path), "--variant", "x:data.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "LABEL:key=value" in err and "changes the data" in err and "Traceback" not in err


def test_bench_recompute_adds_the_greedy_training_with_recomputed_adapters(write_recipe, tmp_path, capsys):
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8))
    out = tmp_path / "result"
    assert main(["bench", str(path), "--steps", "1", "--warmup", "0", "--segments", "none", "--recompute", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    g, rc = data["greedy"], data["greedy_recompute"]
    assert rc["peak_bytes"] < g["peak_bytes"] and rc["live_peak_backward_bytes"] > 0  # recomputation counted
    assert data["ratios"]["greedy_recompute_memory"] == rc["peak_bytes"] / data["e2e"]["peak_bytes"]
    assert "greedy K=4, context.recompute" in printed and "--recompute" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists()


def test_bench_counts_each_configurations_work(write_recipe, tmp_path, capsys):
    """FLOPs per step: greedy K=1 without context does end to end's arithmetic exactly; recomputing
    the adapters adds their forward once more; FLOP/s and efficiency are in the JSON and the tables."""
    one = write_recipe(small_recipe_text(modules=1, context="none", batch_size=4, train_size=8), "one.toml")
    out = tmp_path / "one"
    assert main(["bench", str(one), "--steps", "1", "--warmup", "0", "--segments", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    g, e, ckpt = data["greedy"], data["e2e"], data["checkpointing"][0]
    assert g["flops_per_step"] == e["flops_per_step"] > 0 and data["ratios"]["flops"] == 1.0
    assert ckpt["flops_per_step"] > e["flops_per_step"]  # checkpointing recomputes its segments in backward
    for c in (g, e, ckpt):
        assert c["flops_per_s"] == c["flops_per_step"] / (c["step_ms_median"] / 1000)
    assert e["efficiency"] == 1.0 and g["efficiency"] == g["flops_per_s"] / e["flops_per_s"] == data["ratios"]["efficiency"]
    assert ckpt["efficiency"] == ckpt["flops_per_s"] / e["flops_per_s"]
    printed = capsys.readouterr().out
    assert "GFLOP per step" in printed and "efficiency" in printed
    assert "| achieved GFLOP/s (efficiency) |" in out.with_suffix(".md").read_text()
    four = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8), "four.toml")
    out = tmp_path / "four"
    heads = "recompute + heads:context.recompute=true;context.recompute_head=true"
    argv = ["bench", str(four), "--steps", "1", "--warmup", "0", "--segments", "none", "--recompute", "--variant", heads]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    g, rc = data["greedy"], data["greedy_recompute"]
    assert rc["flops_per_step"] > g["flops_per_step"] > data["e2e"]["flops_per_step"]  # R1E's adapters, then again
    # the heads' recomputation (an autograd.grad inside backward) is counted too, not a crash after the timing
    assert data["variants"][0]["flops_per_step"] > rc["flops_per_step"]
    assert rc["flops_ratio"] == rc["flops_per_step"] / data["e2e"]["flops_per_step"]
    assert data["ratios"]["greedy_recompute_efficiency"] == rc["efficiency"]


def test_bench_compiles_what_each_recipe_says(write_recipe, tmp_path, monkeypatch, recwarn):
    """run.compile: greedy and end to end follow the recipe, a variant its own recipe, so the
    compiled and the uncompiled step can be timed in one run; compilation is timed apart only
    where it happened. (The compiler itself is replaced by a recorder: its results are
    tests/test_compiling.py's.)"""
    import contsup.tools.bench as bench

    compiled: list[int] = []
    monkeypatch.setattr(bench, "compile_network", lambda network: compiled.append(network.num_modules))
    monkeypatch.setattr(bench, "compile_pieces", lambda named: compiled.append(-len(list(named))))
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8))
    out = tmp_path / "result"
    argv = ["bench", str(path), "--steps", "1", "--warmup", "0", "--segments", "2", "--set", "run.compile=true",
            "--variant", "eager:run.compile=false", "--variant", "DGL:context.use=none", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["compiled"] == ["greedy", "e2e", "ckpt2", "variant:DGL"]
    units = sum(data["sizes"])  # checkpointing compiles the backbone's units one by one
    assert sorted(compiled) == [-units, 1, 4, 4]  # end to end (one module), greedy, DGL; the eager variant left alone
    variants = {v["label"]: v for v in data["variants"]}
    assert "compile_s" in data["greedy"] and "compile_s" in data["e2e"] and "compile_s" in variants["DGL"]
    assert "compile_s" not in variants["eager"] and "first_step_s" not in variants["eager"]
    markdown = out.with_suffix(".md").read_text()
    assert "under torch.compile (run.compile): greedy, end-to-end, checkpointing S=2, DGL (" in markdown
    assert not [w for w in recwarn if "optimizer.step()" in str(w.message)]  # nothing said of the meters' copies


def test_a_configuration_whose_flops_cannot_be_counted_keeps_its_timings(write_recipe, tmp_path, monkeypatch, capsys):
    """FLOPs are counted after every timed step: a configuration the counter trips on loses its
    FLOP figures (one warning naming it), not the run."""
    import contsup.tools.bench as bench

    real = bench.measure_flops

    def picky(strategy, x, y):
        if strategy.network.num_modules > 1:
            raise RuntimeError("the counter cannot follow this\nmore")
        return real(strategy, x, y)

    monkeypatch.setattr(bench, "measure_flops", picky)
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4, train_size=8))
    out = tmp_path / "result"
    with pytest.warns(UserWarning, match=r"the FLOPs of greedy could not be counted \(RuntimeError: the counter cannot follow this\)"):
        assert main(["bench", str(path), "--steps", "1", "--warmup", "0", "--segments", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["greedy"]["flops_per_step"] == 0 and len(data["greedy"]["step_ms"]) == 1
    assert data["e2e"]["flops_per_step"] > 0 and data["checkpointing"][0]["flops_per_step"] > 0
    printed = capsys.readouterr().out
    assert any(line.startswith("GFLOP per step") and line.split()[-2:] == ["-", "-"] for line in printed.splitlines())
