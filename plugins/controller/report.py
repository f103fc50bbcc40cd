"""Print and plot what a calibration measured: each cell's effect, the search, share served vs quality."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _budget_share(budget: Mapping[str, Any], value: float) -> float:
    """The same scale as `core.quality.budget_fraction`: value / max, or the MSE ratio of a dB bound."""
    if budget["max"] is not None:
        return value / budget["max"]
    return 10.0 ** ((budget["min"] - value) / 10.0)


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text summary of a plan's calibration report (`ServingPlan.report`)."""
    bands = report["bands"]
    terms = [b["kind"] for b in report["budget"]]
    lines = [f"calibration {report['date']}: {report['prompts']} prompts, {report['runs']} sampler runs, "
             f"{report['seconds']:.0f} s; served {100 * report['share_served']:.1f} % of layer-steps",
             "budget: " + ", ".join(f"{b['kind']} {'<=' if b['max'] is not None else '>='} "
                                    f"{b['max'] if b['max'] is not None else b['min']:g}" for b in report["budget"]),
             "final:  " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["final_scores"].items()),
             "", "cell effects alone (cost = weighted share of the budget per layer-step):",
             "| layer | band | cost | " + " | ".join(terms) + " |", "|---|---|---|" + "---|" * len(terms)]
    for c in sorted(report["cells"], key=lambda c: (c["layer"], c["band"])):
        lines.append(f"| {c['layer']} | {bands[c['band']]} | {_fmt(c['cost'])} | "
                     + " | ".join(_fmt(c["scores"].get(t)) for t in terms) + " |")
    lines += ["", "search (cumulative):"]
    for s in report["search"]:
        mark = "+" if s["accepted"] else "-"
        lines.append(f"  {mark} {s['layer']} {bands[s['band']]}: share {100 * s['share']:.1f} %"
                     + (f"  ({s['reason']})" if s["reason"] else ""))
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """PNG: per-cell cost (layers × σ bands) and share served vs budget used along the search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({c["layer"] for c in report["cells"]})
    bands = report["bands"]
    grid = np.full((len(layers), len(bands)), np.nan)
    for c in report["cells"]:
        cost = c["cost"] if isinstance(c["cost"], (int, float)) else np.inf
        grid[layers.index(c["layer"]), c["band"]] = min(cost, 10.0)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.35 * len(layers) + 1.5)))
    im = ax0.imshow(grid, aspect="auto", cmap="magma_r", vmin=0)
    ax0.set_yticks(range(len(layers)), layers)
    ax0.set_xticks(range(len(bands)), bands, rotation=30, ha="right")
    ax0.set_title("cost of serving each cell alone (budget share / layer-step)")
    fig.colorbar(im, ax=ax0)
    accepted = [s for s in report["search"] if s["accepted"]]
    budgets = report["budget"]
    for b in budgets:
        kind = b["kind"]
        ys = [s["scores"].get(kind) for s in accepted]
        xs = [100 * s["share"] for s in accepted]
        pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float))]
        if pts:
            ax1.plot([p[0] for p in pts], [_budget_share(b, p[1]) for p in pts], marker="o", label=kind)
    ax1.axhline(1.0, color="grey", ls="--", lw=1)
    ax1.set_xlabel("share of layer-steps served (%)")
    ax1.set_ylabel("share of the term's budget used")
    ax1.set_title("the plan as the search grew it")
    if ax1.get_legend_handles_labels()[0]:  # a plan with no accepted cell has no labelled line
        ax1.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out `fig`, write it as `path` (its folder created), close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
