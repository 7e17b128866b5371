"""Context weight maps: how strongly each module's adapters weigh each context source.

For the adapter M_{l,s} (source s into module l) the map's entry is the mean, over the adapter's
weight layers (convolutions and linear maps), of

    sum |W| / (C_out * C_in)

i.e. the L1 norm of one kernel averaged over the (output channel, input channel) pairs: for a
1x1 convolution it is the mean absolute weight. A weight layer followed directly by a batch norm
is scaled by gamma / sqrt(running_var + eps) per output channel first (folded), because a batch
norm makes the raw weights' scale meaningless; ``fold_bn=False`` uses the raw weights. This is
the paper's Figure 6 ("average L1 norm, normalised by the channel number of features").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contsup.errors import ContsupError
from contsup.tools.plotting import new_figure, save_png
from contsup.tools.probe import run_label
from contsup.config.reading import read_toml
from contsup.training.rundir import RECIPE_FILE, atomic_write, load_model

WEIGHTS_FILE = "weights.json"
WEIGHTS_PLOT = "weights.png"
DEFINITION = (
    "mean over the adapter's conv/linear layers of sum|W| / (C_out * C_in), "
    "with a directly following batch norm folded in (W * gamma / sqrt(running_var + eps))"
)


def effective_weights(adapter: nn.Module, fold_bn: bool = True) -> list[torch.Tensor]:
    """The adapter's conv/linear weights (C_out, C_in, ...), in order, each scaled by the batch
    norm that directly follows it when ``fold_bn``."""
    leaves = [m for m in adapter.modules() if not list(m.children())]
    out = []
    for i, m in enumerate(leaves):
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        w = m.weight.detach().float()
        nxt = leaves[i + 1] if i + 1 < len(leaves) else None
        if (
            fold_bn
            and isinstance(nxt, nn.modules.batchnorm._BatchNorm)
            and nxt.running_var is not None
            and nxt.num_features == w.shape[0]
        ):
            scale = torch.ones_like(nxt.running_var) if nxt.weight is None else nxt.weight.detach()
            scale = scale.float() / torch.sqrt(nxt.running_var.float() + nxt.eps)
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        out.append(w)
    return out


def adapter_norm(adapter: nn.Module, fold_bn: bool = True) -> float | None:
    """The map's entry for one adapter (see the module docstring); None when it has no weights."""
    norms = [float(w.abs().sum()) / (w.shape[0] * w.shape[1]) for w in effective_weights(adapter, fold_bn)]
    return sum(norms) / len(norms) if norms else None


def weight_map(network: Any, fold_bn: bool = True) -> list[dict]:
    """One entry per adapter M_{l,s} of a GreedyNetwork: destination l, source ("x" or "hJ"), value."""
    entries = []
    for m in network.blocks:
        for source in m.sources:
            adapter = m.adapters[str(source)]
            entries.append(
                {
                    "destination": m.index,
                    "source": str(source),
                    "value": adapter_norm(adapter, fold_bn),
                    "layers": len(effective_weights(adapter, fold_bn)),
                    "adapter": type(adapter).__name__,
                }
            )
    return entries


def _source_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == "x" else (1, int(name[1:]))


def plot_weight_map(data: dict, path: str | Path, title: str | None = None) -> Path:
    """Figure 6's layout: x axis the destination module, y axis the source (x, h0, h1, ...)."""
    import numpy as np

    k = int(data["modules"])
    entries = data["entries"]
    rows = ["x"] + [f"h{j}" for j in range(max(k - 1, 1))]
    rows += sorted({e["source"] for e in entries} - set(rows), key=_source_order)
    cols = list(range(2, k + 1)) or [1]
    grid = np.full((len(rows), len(cols)), np.nan)
    for e in entries:
        if e["value"] is not None and e["destination"] in cols:
            grid[rows.index(e["source"]), cols.index(e["destination"])] = e["value"]
    side = max(4.5, 0.42 * len(cols) + 2.5)
    fig, ax = new_figure(side + 1.2, max(3.5, 0.36 * len(rows) + 1.8))
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    cmap = colormaps["viridis"].with_extremes(bad="0.93")
    finite = grid[np.isfinite(grid)]
    log = finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > 10
    norm = LogNorm(finite.min(), finite.max()) if log else None  # M_E and M_R can differ by orders of magnitude
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    what = "sum |W| / (C_out C_in)" + ("  (BN folded)" if data.get("fold_bn", True) else "")
    bar.set_label(what + (", log scale" if log else ""))
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("destination module l")
    ax.set_ylabel("context source s")
    ax.set_title(title or data.get("label", "context adapter weights"), fontsize=10)
    fig.text(0.01, 0.005, "x: the input through M_E;  hJ: h_J^c through M_R;  grey: no adapter", fontsize=7, color="0.35")
    if len(cols) <= 20 and np.isfinite(grid).any():
        size = 9 if len(cols) <= 4 else 7 if len(cols) <= 10 else 6
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                light = float(image.norm(v)) > 0.6
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=size, color="black" if light else "white")
    return save_png(fig, path)


def weights_main(run_dir: str, out: str | None, raw: bool) -> int:
    """``contsup weights``: write RUN_DIR/weights.json and the heat map."""
    path = Path(run_dir)
    network = load_model(path)
    entries = weight_map(network, fold_bn=not raw)
    if not entries:
        raise ContsupError(f"{run_dir}: the network has no context adapters (its recipe's context is none); there is no weight map to draw")
    data = {
        "run_dir": str(path),
        "label": run_label(path, read_toml(path / RECIPE_FILE)),
        "modules": network.num_modules,
        "definition": DEFINITION if not raw else "mean over the adapter's conv/linear layers of sum|W| / (C_out * C_in), raw weights",
        "fold_bn": not raw,
        "entries": entries,
    }
    atomic_write(path / WEIGHTS_FILE, lambda f: json.dump(data, f, indent=2), binary=False)
    png = plot_weight_map(data, Path(out) if out else path / WEIGHTS_PLOT)
    for e in sorted(entries, key=lambda e: (e["destination"], _source_order(e["source"]))):
        value = "-" if e["value"] is None else f"{e['value']:.4f}"
        print(f"module {e['destination']:>3} <- {e['source']:>4}: {value}  ({e['adapter']})")
    print(f"wrote {path / WEIGHTS_FILE} and {png}")
    return 0


def load_weights(run_dir: str | Path) -> dict | None:
    """RUN_DIR/weights.json, or None."""
    p = Path(run_dir) / WEIGHTS_FILE
    return json.loads(p.read_text()) if p.exists() else None

