"""Information probes: how much task-relevant information I(h_l, y) each module's output keeps.

For every module l of a trained network (frozen, in eval mode) a fresh probe classifier
q(y | h_l) is trained on the training set's features, and

    I(h_l, y) ~ H(y) - CE(q),   CE(q) = mean over held-out (h, y) of -log q(y | h),   in nats,

the estimate of the paper's Appendix D (after InfoPro). Since CE(q) >= H(y | h) for any q, the
estimate is a lower bound in expectation; a better probe tightens it. The paper takes the best q
along training; here the best epoch is chosen on a validation split carved from the training set
and CE is reported on the test set, so the estimate never selects on the data it reports.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from contsup.errors import ContsupError
from contsup.tools.probe_options import ProbeOptions, check_options  # noqa: F401 (re-exported)
from contsup.types import Shape
from contsup.tools.plotting import colours, method_label, new_figure, save_png
from contsup.tools.results import flatten
from contsup.training.device import resolve_device
from contsup.config.reading import read_toml
from contsup.config.recipe import load_recipe
from contsup.training.rundir import MODEL_FILE, RECIPE_FILE, atomic_write, load_model

PROBE_FILE = "probe.json"
PROBE_PLOT = "probe.png"


# -- the probe network -------------------------------------------------------------------------


class ProbeNet(nn.Module):
    """q(y | h): a CIFAR-style ResNet-(6n+2) whose first layer adapts the feature.

    h: (B, C, H, W) is resized to (size, size) (bilinear up, average pool down), then a 3x3 conv
    maps C channels to ``width``; three stages of BasicBlocks (width, 2 width, 4 width; stride 1,
    2, 2), global average pool, linear -> (B, num_classes) logits.
    """

    def __init__(self, in_shape: Shape, num_classes: int, depth: int = 8, width: int = 16, size: int = 0) -> None:
        super().__init__()
        from timm.models.resnet import BasicBlock

        c, h, w = in_shape
        self.size = (size, size) if size else (h, w)
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        inplanes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for b in range((depth - 2) // 6):
                stride = 2 if stage > 0 and b == 0 else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(inplanes, planes, stride=stride, downsample=down))
                inplanes = planes
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)

    def resize(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, C, H, W) -> (B, C, size, size)."""
        if tuple(h.shape[-2:]) == self.size:
            return h
        if h.shape[-2] < self.size[0] or h.shape[-1] < self.size[1]:
            return F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(h, self.size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.blocks(self.stem(self.resize(h)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


# -- the estimator -----------------------------------------------------------------------------


def label_entropy(y: torch.Tensor, num_classes: int) -> float:
    """H(y) in nats of the empirical label distribution of y: (N,)."""
    p = torch.bincount(y.long().cpu(), minlength=num_classes).double() / max(len(y), 1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@attrs.frozen
class ProbeResult:
    """One probe: I(h, y) ~ H(y) - CE on held-out data (nats), the probe's accuracy there, and
    per-epoch history (train loss, validation and test cross-entropy, test accuracy)."""

    information_nats: float
    cross_entropy_nats: float
    entropy_nats: float
    accuracy_pct: float
    best_epoch: int
    history: tuple[dict, ...]


@torch.no_grad()
def _score(probe: nn.Module, h: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy %) of ``probe`` on h: (N, C, H, W), y: (N,)."""
    probe.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        hb, yb = h[i : i + batch].to(device), y[i : i + batch].to(device)
        z = probe(hb)
        loss += float(F.cross_entropy(z, yb, reduction="sum"))
        correct += int((z.argmax(1) == yb).sum())
    return loss / len(y), 100.0 * correct / len(y)


def estimate_information(
    train_h: torch.Tensor,
    train_y: torch.Tensor,
    test_h: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    options: ProbeOptions = ProbeOptions(),
    device: torch.device | str = "cpu",
    seed_offset: int = 0,
) -> ProbeResult:
    """Train a fresh probe on (train_h: (N, C, H, W), train_y: (N,)) and estimate I(h, y) on the
    test pair: H(test y) - CE at the epoch with the lowest validation cross-entropy."""
    device = torch.device(device)
    seed = options.seed * 100_003 + seed_offset
    g = torch.Generator().manual_seed(seed)
    n = len(train_y)
    n_val = int(round(n * options.val_fraction))
    if n - n_val < 2:
        raise ContsupError(f"probe: {n} training features leave fewer than 2 to train on; lower --val-fraction or raise --train-size")
    order = torch.randperm(n, generator=g)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_h, fit_y = train_h[fit_idx], train_y[fit_idx]
    val_h, val_y = train_h[val_idx], train_y[val_idx]
    torch.manual_seed(seed)
    probe = ProbeNet(tuple(train_h.shape[1:]), num_classes, options.depth, options.width, options.size).to(device)
    opt = torch.optim.SGD(probe.parameters(), lr=options.lr, momentum=0.9, nesterov=True, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(len(fit_y) / options.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=options.epochs * steps_per_epoch)
    entropy = label_entropy(test_y, num_classes)
    history: list[dict] = []
    best: dict | None = None
    for epoch in range(1, options.epochs + 1):
        probe.train()
        perm = torch.randperm(len(fit_y), generator=g)
        total, seen = 0.0, 0
        for i in range(0, len(perm), options.batch_size):
            idx = perm[i : i + options.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                sched.step()
                continue
            hb, yb = fit_h[idx].to(device), fit_y[idx].to(device)
            loss = F.cross_entropy(probe(hb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
            seen += len(idx)
        val_ce = _score(probe, val_h, val_y, 256, device)[0] if n_val else None
        test_ce, test_acc = _score(probe, test_h, test_y, 256, device)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_ce_nats": val_ce, "test_ce_nats": test_ce, "test_acc_pct": test_acc}
        history.append(row)
        if best is None or (val_ce is None or val_ce < best["val_ce_nats"]):
            best = row
    assert best is not None
    return ProbeResult(
        information_nats=entropy - best["test_ce_nats"],
        cross_entropy_nats=best["test_ce_nats"],
        entropy_nats=entropy,
        accuracy_pct=best["test_acc_pct"],
        best_epoch=best["epoch"],
        history=tuple(history),
    )


def summarise(probes: Sequence[ProbeResult]) -> dict:
    """One module's entry in probe.json: the mean (and std over repeats) of its probes' estimates."""
    info = [p.information_nats for p in probes]
    return {
        "information_nats": statistics.fmean(info),
        "information_std_nats": statistics.stdev(info) if len(info) > 1 else None,
        "cross_entropy_nats": statistics.fmean(p.cross_entropy_nats for p in probes),
        "probe_acc_pct": statistics.fmean(p.accuracy_pct for p in probes),
        "probes": [
            {"information_nats": p.information_nats, "cross_entropy_nats": p.cross_entropy_nats, "probe_acc_pct": p.accuracy_pct,
             "best_epoch": p.best_epoch, "history": list(p.history)}
            for p in probes
        ],
    }


# -- features of a trained network -------------------------------------------------------------


def outputs_upto(network: Any, x: torch.Tensor, last: int) -> list[torch.Tensor]:
    """[h_1, ..., h_last] of a GreedyNetwork for x: (B, C, H, W), context included; the same
    tensors as ``network.module_outputs(x)[:last]`` without running the later modules."""
    return network.module_outputs(x, last)


def feature_shapes(network: Any, input_shape: Shape) -> list[Shape]:
    """The shapes (C, H, W) of h_0 = x, h_1, ..., h_K for one input of ``input_shape``."""
    with torch.no_grad():
        device = next(network.parameters()).device
        outs = outputs_upto(network, torch.zeros((2, *input_shape), device=device), network.num_modules)
    return [tuple(input_shape)] + [tuple(o.shape[1:]) for o in outs]


def chunks(modules: Sequence[int], bytes_each: Sequence[int], limit: int) -> list[list[int]]:
    """``modules`` in order, grouped so each group's features fit in ``limit`` bytes (at least
    one module per group): one pass over the data computes a group."""
    out: list[list[int]] = []
    size = 0
    for module, b in zip(modules, bytes_each):
        if out and size + b <= limit:
            out[-1].append(module)
            size += b
        else:
            out.append([module])
            size = b
    return out


@torch.no_grad()
def collect(network: Any, dataset: Dataset, modules: Sequence[int], device: torch.device, batch_size: int = 256) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({l: h_l for every l in modules (0 = x)}, labels), on the CPU, in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    last = max(modules)
    parts: dict[int, list[torch.Tensor]] = {module: [] for module in modules}
    labels = []
    for x, y in loader:
        x = x.to(device)
        outs = [x] + (outputs_upto(network, x, last) if last > 0 else [])
        for module in modules:
            parts[module].append(outs[module].cpu())
        labels.append(y)
    return {module: torch.cat(p) for module, p in parts.items()}, torch.cat(labels)


def iter_features(
    network: Any, train: Dataset, test: Dataset, modules: Sequence[int], shapes: Sequence[Shape], device: torch.device, limit: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(l, train h_l, train y, test h_l, test y) for each l in ``modules``, computing as many
    modules per pass as ``limit`` bytes of features allow."""
    n = len(train) + len(test)
    sizes = [n * math.prod(shapes[module]) * 4 for module in modules]
    for group in chunks(modules, sizes, limit):
        train_h, train_y = collect(network, train, group, device)
        test_h, test_y = collect(network, test, group, device)
        for module in group:
            yield module, train_h.pop(module), train_y, test_h.pop(module), test_y


# -- one run -----------------------------------------------------------------------------------


def label_method(label: str) -> str:
    """The method part of a run label: ``digits_dgl: DGL, K=16`` -> ``DGL``."""
    return label.split(": ", 1)[-1].rsplit(", K=", 1)[0]


def run_label(run_dir: Path, recipe_table: dict) -> str:
    """The legend name of a run: its directory, method and K (e.g. ``digits_dgl: DGL, K=16``)."""
    config = flatten(recipe_table)
    return f"{Path(run_dir).name}: {method_label(config)}, K={config.get('partition.modules', '?')}"


def parse_modules(text: str | None, k: int) -> list[int]:
    """``"0,4,8-16"`` -> [0, 4, 8, ..., 16]; None -> 0..K (0 is the input x)."""
    if not text:
        return list(range(k + 1))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ContsupError(f"--modules: '{part}' is not a module index or range like 4 or 8-16") from None
    bad = sorted(module for module in out if not 0 <= module <= k)
    if bad:
        raise ContsupError(f"--modules: {bad} outside 0..{k} (0 is the input x, 1..{k} the modules' outputs)")
    return sorted(out)


def probe_run(
    run_dir: str | Path,
    options: ProbeOptions = ProbeOptions(),
    modules: str | None = None,
    device: str = "auto",
    log: TextIO | None = None,
) -> dict:
    """Probe the chosen modules (default: every one) of a finished run and write them into
    RUN_DIR/probe.json, keeping the other modules' results already there when they were made with
    the same options; returns what was written."""
    log = log or sys.stderr
    run_dir = Path(run_dir)
    network = load_model(run_dir)
    dev = resolve_device(device)
    network = network.to(dev).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    table = read_toml(run_dir / RECIPE_FILE)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    dataset = recipe.dataset.create()
    info = network.info or dataset.info()
    k = network.num_modules
    chosen = parse_modules(modules, k)
    requested = attrs.asdict(options)
    size = options.size or int(info.input_shape[-1])
    options = attrs.evolve(options, size=size)
    train, test = dataset.load(train=True), dataset.load(train=False)
    if options.train_size and options.train_size < len(train):
        g = torch.Generator().manual_seed(options.seed)
        train = Subset(train, torch.randperm(len(train), generator=g)[: options.train_size].sort().values.tolist())
    shapes = feature_shapes(network, tuple(info.input_shape))
    label = run_label(run_dir, table)
    log.write(f"probing {run_dir} ({label}): modules {chosen[0]}..{chosen[-1]}, {len(train)} training and {len(test)} test images\n")
    results = []
    start = time.perf_counter()
    for module, train_h, train_y, test_h, test_y in iter_features(network, train, test, chosen, shapes, dev, options.cache_mib * 2**20):
        t0 = time.perf_counter()
        probes = [
            estimate_information(train_h, train_y, test_h, test_y, info.num_classes, attrs.evolve(options, seed=options.seed + i), dev, seed_offset=module)
            for i in range(options.repeats)
        ]
        name = "x" if module == 0 else f"h{module}"
        row = summarise(probes)
        results.append({"module": module, "feature": name, "shape": list(shapes[module]), **row})
        spread = f" ± {row['information_std_nats']:.3f}" if row["information_std_nats"] is not None else ""
        log.write(
            f"  {name:>4} {'x'.join(map(str, shapes[module])):>9}: I = {row['information_nats']:.3f}{spread} nats "
            f"(H(y) {probes[0].entropy_nats:.3f}), probe accuracy {row['probe_acc_pct']:.1f}% [{time.perf_counter() - t0:.1f}s]\n"
        )
        log.flush()
    data = {
        "run_dir": str(run_dir),
        "label": label,
        "modules": k,
        "entropy_nats": label_entropy(test_y, info.num_classes),
        "estimate": "H(y) - CE of the probe on the test set, at the epoch with the lowest validation CE (nats); mean over repeats",
        "options": requested,
        "probe_side": size,
        "device": str(dev),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    saved = load_probe(run_dir)
    if saved is not None and _same_options(saved, options_asked=requested, modules=k):
        new = {r["module"] for r in results}
        kept = [r for r in saved.get("results", []) if r["module"] not in new]
        data["results"] = sorted(kept + results, key=lambda r: r["module"])
        data["seconds"] += float(saved.get("seconds", 0.0))
    atomic_write(run_dir / PROBE_FILE, lambda f: json.dump(data, f, indent=2), binary=False)
    return data


def only_modules(data: dict, modules: Sequence[int]) -> dict:
    """``data`` with the results of ``modules`` alone."""
    wanted = set(modules)
    return {**data, "results": [r for r in data["results"] if r["module"] in wanted]}


def load_probe(run_dir: str | Path) -> dict | None:
    """RUN_DIR/probe.json, or None when the run has not been probed."""
    path = Path(run_dir) / PROBE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ContsupError(f"{path}: not valid JSON ({exc}); run contsup probe {run_dir} again") from None


# -- the figure --------------------------------------------------------------------------------


def plot_information(probes: Sequence[tuple[str, Any, dict]], path: str | Path, title: str | None = None) -> Path:
    """I(h_l, y) and probe accuracy against module index, one line per (label, colour, probe.json)."""
    fig, (ax_i, ax_a) = new_figure(12.0, 4.6, cols=2)
    entropies = []
    k_max = 0
    for label, colour, data in probes:
        rows = sorted(data["results"], key=lambda r: r["module"])
        xs = [r["module"] for r in rows]
        k_max = max(k_max, data.get("modules", max(xs)))
        std = [r.get("information_std_nats") or 0.0 for r in rows]
        ax_i.errorbar(xs, [r["information_nats"] for r in rows], yerr=std if any(std) else None, marker="o", capsize=2, color=colour, label=label)
        ax_a.plot(xs, [r["probe_acc_pct"] for r in rows], marker="o", color=colour, label=label)
        entropies.append(data["entropy_nats"])
    if entropies:
        h = max(entropies)
        ax_i.axhline(h, color="0.5", linestyle="--", linewidth=1)
        ax_i.annotate(f"H(y) = {h:.2f} nats", (0, h), xytext=(2, -12), textcoords="offset points", color="0.4", fontsize=8)
    ticks = list(range(0, k_max + 1))
    for ax in (ax_i, ax_a):
        ax.set_xticks(ticks, ["x"] + [str(t) for t in ticks[1:]])
        ax.set_xlabel("module l (x = the input)")
        ax.grid(alpha=0.3)
    ax_i.set_ylabel("I(h_l, y) estimate (nats)")
    ax_i.set_title("task-relevant information per module")
    ax_a.set_ylabel("probe test accuracy (%)")
    ax_a.set_title("accuracy of the probe q(y | h_l)")
    ax_i.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def probe_main(run_dirs: Sequence[str], options: ProbeOptions, modules: str | None, device: str, plot: str | None, reuse: bool) -> int:
    """``contsup probe``: probe each run (or reuse its probe.json), then draw them in one figure."""
    problems = []
    for d in run_dirs:
        p = Path(d)
        if not (p / RECIPE_FILE).exists():
            problems.append(f"{d}: not a run directory (no {RECIPE_FILE})")
        elif not (p / MODEL_FILE).exists():
            problems.append(f"{d}: has no {MODEL_FILE}; the run has not finished")
    if problems:
        raise ContsupError(*problems)
    probes = []
    for d in run_dirs:
        data, todo = load_probe(d) if reuse else None, modules
        if data is not None and not _same_options(data, attrs.asdict(options), int(data.get("modules", -1))):
            print(f"{d}: {PROBE_FILE} was made with other options; probing again", file=sys.stderr)
            data = None
        elif data is not None:
            wanted = parse_modules(modules, int(data["modules"]))
            have = {r["module"] for r in data.get("results", [])}
            missing = [module for module in wanted if module not in have]
            if missing:
                print(f"{d}: {PROBE_FILE} lacks modules {', '.join(map(str, missing))}; probing them", file=sys.stderr)
                data, todo = None, ",".join(map(str, missing))
            else:
                print(f"{d}: reusing {PROBE_FILE}", file=sys.stderr)
                data = only_modules(data, wanted)
        if data is None:
            saved = probe_run(d, options, todo, device)  # with what was there from the same options
            data = only_modules(saved, parse_modules(modules, saved["modules"]))
        probes.append(data)
        _print_table(data)
    out = Path(plot) if plot else (Path(run_dirs[0]) / PROBE_PLOT if len(run_dirs) == 1 else Path(PROBE_PLOT))
    palette = colours((p["label"] for p in probes), method=label_method)
    plot_information([(p["label"], palette[p["label"]], p) for p in probes], out)
    print(f"wrote {', '.join(str(Path(d) / PROBE_FILE) for d in run_dirs)} and {out}")
    return 0


def _same_options(data: dict, options_asked: dict, modules: int) -> bool:
    """Whether a saved probe.json was made with these probe options, on a network of ``modules`` modules."""
    return data.get("options") == options_asked and data.get("modules") == modules and isinstance(data.get("results"), list)


def _print_table(data: dict) -> None:
    print(f"{data['label']}  (H(y) = {data['entropy_nats']:.3f} nats)")
    print("  module  feature shape  I(h_l, y) nats   probe acc %")
    for r in data["results"]:
        name = "x" if r["module"] == 0 else str(r["module"])
        std = r.get("information_std_nats")
        info = f"{r['information_nats']:.3f}" + (f" ± {std:.3f}" if std is not None else "")
        print(f"  {name:>6}  {'x'.join(map(str, r['shape'])):>13}  {info:>15}  {r['probe_acc_pct']:>11.1f}")
