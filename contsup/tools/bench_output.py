"""``contsup bench``'s results for people: the console tables, the memory-versus-time figure and
the Markdown page."""

from __future__ import annotations

from typing import Any

from contsup.tools.plotting import new_figure, save_png



def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _giga(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _method(summary: dict | None) -> str:
    """A variant's training method as ``name (value)``, or ``none``."""
    if not summary:
        return "none"
    return ", ".join(f"{name} ({value})" if value is not True else name for name, value in summary.items())


def bench_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(figure, end-to-end, greedy, greedy / end-to-end) rows."""
    g, e, r = result["greedy"], result["e2e"], result["ratios"]
    rows = [
        ("saved for backward, peak (MiB)", _mib(e["saved_peak_bytes"]), _mib(g["saved_peak_bytes"]), f"{r['saved_memory']:.3f}"),
        ("predicted peak (MiB)", "-", _mib(g["predicted_peak_bytes"]), "-"),
        ("median step (ms)", f"{e['step_ms_median']:.1f}", f"{g['step_ms_median']:.1f}", f"{r['step_time']:.3f}"),
    ]
    counted = bool(e["flops_per_step"] and g["flops_per_step"])  # 0: the counter could not follow one (bench warned)
    giga = lambda v: _giga(v) if v else "-"  # noqa: E731
    rows += [
        ("GFLOP per step", giga(e["flops_per_step"]), giga(g["flops_per_step"]), f"{r['flops']:.3f}" if counted else "-"),
        ("achieved GFLOP/s (efficiency)", giga(e["flops_per_s"]), giga(g["flops_per_s"]), f"{r['efficiency']:.3f}" if counted else "-"),
    ]
    if "compile_s" in g:  # run.compile: compilation apart from the steps
        rows.append(("compilation: first step less a median one (s)", f"{e['compile_s']:.1f}", f"{g['compile_s']:.1f}", "-"))
    if "peak_rss_bytes" in g:
        rows.append(("process peak RSS (MiB)", _mib(e["peak_rss_bytes"]), _mib(g["peak_rss_bytes"]), "-"))
        before = _mib(result["rss_before_steps_bytes"])
        rows.append(("process peak RSS before any step (MiB)", before, before, "-"))
    if "cuda_step_peak_bytes" in g:
        rows.append(
            ("CUDA peak during a step (MiB)", _mib(e["cuda_step_peak_bytes"]), _mib(g["cuda_step_peak_bytes"]), f"{r['cuda_memory']:.3f}")
        )
    return rows


def configurations(result: dict) -> list[tuple[str, dict]]:
    """(label, figures) of every configuration measured: end-to-end, greedy, each checkpointing."""
    k, best = result["modules_k"], result.get("checkpointing_best_segments")
    out = [("end-to-end", result["e2e"]), (f"greedy K={k}", result["greedy"])]
    out += [(f"greedy K={k}, {v['label']}", v) for v in result.get("variants", [])]
    for c in result.get("checkpointing", []):
        tags = [t for t, hit in (("S=K", c["segments"] == k), ("best", c["segments"] == best)) if hit]
        out.append((f"checkpointing S={c['segments']}" + (f" ({', '.join(tags)})" if tags else ""), c))
    return out


CONFIGURATION_HEADER = (
    "configuration", "peak MiB", "peak / e2e", "step ms", "step / e2e", "GFLOP/step", "GFLOP/s", "efficiency",
)


MARKDOWN_HEADER = (
    "| configuration | peak kept for backward (MiB) | peak / end-to-end | median step (ms) | step / end-to-end "
    "| GFLOP per step | achieved GFLOP/s | efficiency |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
)


def configuration_rows(result: dict) -> list[tuple[str, ...]]:
    """(configuration, peak kept for backward MiB, peak / end-to-end, median step ms, step /
    end-to-end, GFLOP per step, achieved GFLOP/s, efficiency: that over end-to-end's) for every
    configuration, end-to-end first; the summary rows ``checkpointing S=K`` and
    ``checkpointing best S=..`` last."""
    e = result["e2e"]
    rows = []

    def row(label: str, c: dict) -> tuple[str, ...]:
        work = ("-", "-", "-")  # results written before FLOPs were counted
        if c.get("flops_per_step") and e.get("flops_per_s"):
            work = (_giga(c["flops_per_step"]), _giga(c["flops_per_s"]), f"{c['flops_per_s'] / e['flops_per_s']:.3f}")
        return (
            label, _mib(c["peak_bytes"]), f"{c['peak_bytes'] / e['peak_bytes']:.3f}",
            f"{c['step_ms_median']:.1f}", f"{c['step_ms_median'] / e['step_ms_median']:.3f}", *work,
        )

    rows = [row(label, c) for label, c in configurations(result)]
    k, best = result["modules_k"], result.get("checkpointing_best_segments")
    by_s = {c["segments"]: c for c in result.get("checkpointing", [])}
    if k in by_s:
        rows.append(row("checkpointing S=K", by_s[k]))
    if best is not None:
        rows.append(row(f"checkpointing best S={best}", by_s[best]))
    return rows


def bench_figure(result: dict, path: Any) -> Any:
    """Memory against time, every configuration a point: peak kept for backward (MiB) over the
    median step relative to end-to-end. Written as a PNG at ``path``; returns the path."""
    fig, ax = new_figure(6.5, 4.5)
    e = result["e2e"]
    for label, c in configurations(result):
        marker = "s" if label == "end-to-end" else "o" if label.startswith("greedy") else "^"
        x, y = c["step_ms_median"] / e["step_ms_median"], c["peak_bytes"] / 2**20
        ax.scatter([x], [y], marker=marker, s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("median step / end-to-end")
    ax.set_ylabel("peak kept for backward (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{result['backbone']}, {result['context']} K={result['modules_k']}, batch {result['batch_size']}", fontsize=9
    )
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _compiled_note(result: dict) -> str:
    """Which configurations ran under torch.compile ("" where none did)."""
    compiled = result.get("compiled", ["every configuration"] if result.get("compile") else [])
    if not compiled:
        return ""
    names = {"e2e": "end-to-end", "greedy": "greedy"}
    shown = [names.get(n) or (f"checkpointing S={n[4:]}" if n.startswith("ckpt") else n.removeprefix("variant:")) for n in compiled]
    return f"; under torch.compile (run.compile): {', '.join(shown)} (memory and FLOPs counted on uncompiled copies)"


def bench_markdown(result: dict, command: str) -> str:
    """The result as a Markdown section, headed by the command and the machine."""
    lines = [
        f"## {result['backbone']}, {result['context']}, {result['partitioner']} K={result['modules_k']}, batch {result['batch_size']}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}; device {result['device']}; torch {result['torch']}  ",
        f"Steps: median of {result['steps']} after {result['warmup']} warm-up, alternating; "
        f"end-to-end baseline: {result['baseline']}; module sizes {result['sizes']}"
        + _compiled_note(result),
        "",
        "| figure | end-to-end | greedy | greedy / end-to-end |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in bench_rows(result)]
    lines += [
        "",
        f"Measured greedy peak / predicted peak: {result['ratios']['measured_over_predicted']:.3f}. "
        "FLOPs: one step's matrix products and convolutions (forward, backward, recomputation; "
        "`torch.utils.flop_counter`); efficiency: achieved FLOP/s over end-to-end's.",
    ]
    if result.get("checkpointing") or result.get("variants"):
        lines += [""]
        if result.get("checkpointing"):
            lines += [
                "Against activation checkpointing (`torch.utils.checkpoint`, non-reentrant, over S contiguous "
                "groups of the plain backbone's units)."
            ]
        if result.get("variants"):
            lines += [
                "Variants (`--variant`, `--recompute`): the recipe's greedy training with other settings, on the "
                "same batches: "
                + "; ".join(f"{v['label']}: context {v['context']}, head {v['head']}, method {_method(v['method'])}, "
                            f"recompute {v['recompute']}"
                            for v in result["variants"]) + "."
            ]
        lines += [
            "Peak kept for backward: the saved tensors alive at the "
            "worst moment of the step, backward's recomputation included (greedy: the larger of that and "
            "its saved-for-backward figure, which counts the kept context).",
            "",
            *MARKDOWN_HEADER,
        ]
        lines += [f"| {' | '.join(r)} |" for r in configuration_rows(result)]
    if "peak_rss_bytes" in result["greedy"]:
        lines.append(
            "Peak RSS only grows within a process and includes the libraries, the data and the "
            "allocator's caches: the greedy figure is read before any end-to-end step, the end-to-end "
            "one after both ran (so it is the larger of the two). The saved-tensor figure is the one to compare."
        )
    return "\n".join(lines) + "\n"


__all__ = ["CONFIGURATION_HEADER", "MARKDOWN_HEADER", "bench_rows", "configurations", "configuration_rows", "bench_figure", "bench_markdown"]
