"""PNG figures of the Section 7 reports: look rather than read.

- `norm_by_layer`: ||ΔW||_F per layer, one bar per module kind (q_proj, v_proj, slices).
- `spectrum_heatmap`: each layer's share of ||ΔW||_F² per singular value, with its 90% rank.
- `similarity_heatmaps`: φ(i, j) of one layer like the paper's Figures 3 and 4, with the zoom on
  i, j <= min(r1, r2) and the same map for two random Gaussian matrices.
- `similarity_by_layer`: φ(1, 1) and the mean of φ(i, i) per layer, against chance.
- `amplification_by_layer`: Table 7 per layer: the amplification factor, and ||Uᵀ·W·Vhᵀ||_F
  for U, Vh from ΔW, from W and random.

Drawn with matplotlib's object interface (no pyplot, no global backend), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = dict[str, Any]


SHARE_FLOOR = 1e-4  # shares below this are drawn as this
MAX_WIDTH = 14.0  # inches: wide enough for 100 layers' labels, narrow enough to read


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_WIDTH), height), layout="constrained")


def _kinds(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(row["kind"] for row in rows))


def _layers(rows: list[Row]) -> list[int | None]:
    known = sorted({row["layer"] for row in rows if row["layer"] is not None})
    return known + ([None] if any(row["layer"] is None for row in rows) else [])


def _by(rows: list[Row]) -> dict[tuple[str, int | None], Row]:
    return {(row["kind"], row["layer"]): row for row in rows}


def _grouped_bars(ax, rows: list[Row], value, ylabel: str) -> None:
    """One group of bars per layer, one bar per kind; `value(row)` is the bar's height."""
    kinds, layers, table = _kinds(rows), _layers(rows), _by(rows)
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs, ys = [], []
        for x, layer in enumerate(layers):
            row = table.get((kind, layer))
            if row is not None and value(row) is not None:
                xs.append(x + (i - (len(kinds) - 1) / 2) * width)
                ys.append(value(row))
        ax.bar(xs, ys, width=width, label=kind)
    ax.set_xticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")


def norm_by_layer(report: dict[str, Any], path: Path) -> Path:
    """Bar chart of ||ΔW||_F per layer and module kind, from a spectrum report."""
    rows = report["targets"]
    fig = _figure(max(6.0, 0.35 * len(_layers(rows)) * len(_kinds(rows))), 3.6)
    ax = fig.add_subplot()
    _grouped_bars(ax, rows, lambda row: row["frobenius_norm"], "||ΔW||_F")
    ax.set_title("Size of the update per layer: ||ΔW||_F = ||s·B·A||_F")
    fig.savefig(path, dpi=120)
    return path


def spectrum_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Per kind: layers x singular index, the share σ_i²/Σσ² on a log scale (a trained ΔW
    puts most of its energy in σ_1), white dots at the 90% rank."""
    from matplotlib.colors import LogNorm

    rows = report["targets"]
    kinds, layers, table = _kinds(rows), _layers(rows), _by(rows)
    fig = _figure(4.2 * len(kinds), 1.2 + 0.22 * len(layers))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        rank = max(row["rank"] for row in rows if row["kind"] == kind)
        grid = [[float("nan")] * rank for _ in layers]
        for y, layer in enumerate(layers):
            row = table.get((kind, layer))
            if row is None:
                continue
            total = sum(s * s for s in row["singular_values"]) or 1.0
            for x, s in enumerate(row["singular_values"]):
                grid[y][x] = max(s * s / total, SHARE_FLOOR)
            ax.plot(row["effective_rank_90"] - 1, y, "o", color="white", markersize=3)
        norm = LogNorm(vmin=SHARE_FLOOR, vmax=1)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, origin="lower")
        ax.set_title(f"{kind}: share of ||ΔW||_F² per σ_i", fontsize="medium")
        ax.set_xlabel("singular value i")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), ["-" if la is None else str(la) for la in layers])
        ax.set_xticks(_ticks(rank), [str(t + 1) for t in _ticks(rank)])
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("Spectrum of ΔW, log colour scale (dots: rank holding 90% of the energy)")
    fig.savefig(path, dpi=120)
    return path


def _ticks(n: int) -> list[int]:
    step = 1 if n <= 10 else 8 if n <= 80 else max(1, n // 8)
    return list(range(0, n, step))


def _phi_panel(fig, ax, phi: list[list[float]], title: str, xlabel: str, ylabel: str) -> None:
    image = ax.imshow(phi, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(_ticks(len(phi[0])), [str(t + 1) for t in _ticks(len(phi[0]))])
    ax.set_yticks(_ticks(len(phi)), [str(t + 1) for t in _ticks(len(phi))])
    fig.colorbar(image, ax=ax, shrink=0.8)


def similarity_heatmaps(report: dict[str, Any], layer: int | None, path: Path) -> Path:
    """φ(i, j) of every module kind at one layer (the paper's Figures 3 and 4)."""
    rows = [row for row in report["targets"] if row["layer"] == layer]
    randoms = {(r["rank_1"], r["rank_2"], r["dim"]): r["phi"] for r in report["random_reference"]}
    zoom = any(len(row["phi"]) != len(row["phi"][0]) for row in rows)
    columns = 3 if zoom else 2
    fig = _figure(4.2 * columns, 3.4 * len(rows))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    names = (
        _adapter_label(report["adapter_1"]["path"]),
        _adapter_label(report["adapter_2"]["path"]),
    )
    for ax_row, row in zip(axes, rows, strict=True):
        label = f"layer {layer}, {row['kind']}" if layer is not None else row["name"]
        xl, yl = f"j ({names[1]}, r={row['rank_2']})", f"i ({names[0]}, r={row['rank_1']})"
        _phi_panel(fig, ax_row[0], row["phi"], f"φ(i, j), {label}", xl, yl)
        if zoom:
            n = min(len(row["phi"]), len(row["phi"][0]))
            corner = [line[:n] for line in row["phi"][:n]]
            _phi_panel(fig, ax_row[1], corner, f"zoom i, j <= {n}", xl, yl)
        rand = randoms[len(row["phi"]), len(row["phi"][0]), row["dim"]]
        _phi_panel(fig, ax_row[-1], rand, f"two random Gaussian matrices (k={row['dim']})", xl, yl)
    factor = "A (input space)" if report["factor"] == "A" else "B (output space)"
    fig.suptitle(f"Subspace similarity of the top singular directions of {factor}")
    fig.savefig(path, dpi=120)
    return path


def _adapter_label(path: str) -> str:
    """An adapter's directory name, or its run's name for a run's adapter/ directory."""
    p = Path(path)
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name


def similarity_by_layer(report: dict[str, Any], path: Path) -> Path:
    """φ(1, 1) and mean_i φ(i, i) per layer and kind, with chance (1/k and mean i/k)."""
    rows = report["targets"]
    kinds, layers, table = _kinds(rows), _layers(rows), _by(rows)
    fig = _figure(max(6.0, 0.3 * len(layers)), 3.6)
    ax = fig.add_subplot()
    xs = list(range(len(layers)))
    for i, kind in enumerate(kinds):
        got = [table.get((kind, layer)) for layer in layers]
        first = [row["phi"][0][0] if row else float("nan") for row in got]
        mean = [_mean(row["phi_diagonal"]) if row else float("nan") for row in got]
        chance = [_mean(row["expected_random_diagonal"]) if row else float("nan") for row in got]
        color = f"C{i}"
        ax.plot(xs, first, "o-", color=color, label=f"{kind}: φ(1, 1)")
        ax.plot(xs, mean, "s--", color=color, label=f"{kind}: mean φ(i, i)")
        ax.plot(xs, chance, ":", color=color, label=f"{kind}: chance, mean i/k")
    ax.set_xticks(xs, ["-" if layer is None else str(layer) for layer in layers])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("φ")
    ax.set_title("How much two adapters' top directions agree, per layer")
    ax.legend(fontsize="x-small", ncol=len(kinds))
    fig.savefig(path, dpi=120)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def amplification_by_layer(report: dict[str, Any], path: Path) -> Path:
    """Amplification factor per layer, and Table 7's three projections (log scale)."""
    rows = report["targets"]
    kinds, layers, table = _kinds(rows), _layers(rows), _by(rows)
    fig = _figure(max(7.0, 0.35 * len(layers) * len(kinds)), 6.4)
    top, bottom = fig.subplots(2, 1)
    _grouped_bars(top, rows, lambda row: row["amplification"], "||ΔW||_F / ||UᵀWVᵀ||_F")
    top.set_title("Amplification factor (U, V: top directions of ΔW)")
    xs = list(range(len(layers)))
    styles = {"delta": ("ΔW's", "o-"), "w": ("W's", "s--"), "random": ("random", "^:")}
    for i, kind in enumerate(kinds):
        got = [table.get((kind, layer)) for layer in layers]
        for source, (name, style) in styles.items():
            ys = [row["projection"][source] if row else float("nan") for row in got]
            bottom.plot(xs, ys, style, color=f"C{i}", label=f"{kind}: U, V {name}")
        norms = [row["delta_frobenius_norm"] if row else float("nan") for row in got]
        bottom.plot(xs, norms, "x", color=f"C{i}", label=f"{kind}: ||ΔW||_F")
    bottom.set_yscale("log")
    bottom.set_xticks(xs, ["-" if layer is None else str(layer) for layer in layers])
    bottom.set_xlabel("layer")
    bottom.set_ylabel("||UᵀWVᵀ||_F")
    bottom.set_title("W seen through the top directions of ΔW, of W itself, and of random ones")
    bottom.legend(fontsize="x-small", ncol=len(kinds))
    fig.savefig(path, dpi=120)
    return path
