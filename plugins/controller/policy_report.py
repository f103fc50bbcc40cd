"""What a routing-policy study found: Pareto fronts of share served vs quality lost, a table and a PNG."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .report import save_figure

Point = tuple[float, float]  # (share of layer-steps served, quality lost), more share and less loss are better


def mean_points(rows: Iterable[Mapping[str, Any]], x: str = "share", y: str = "loss") -> dict[str, list[dict[str, Any]]]:
    """Per method, each setting's mean over seeds: `{method: [{"setting", "share", "loss", "n"}, ...]}`."""
    acc: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        acc[(r["method"], str(r["setting"]))].append(r)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (method, setting), rs in acc.items():
        out[method].append({"setting": setting, "share": sum(r[x] for r in rs) / len(rs),
                            "loss": sum(r[y] for r in rs) / len(rs), "n": len(rs)})
    return {m: sorted(v, key=lambda p: p["share"]) for m, v in out.items()}


def pareto(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both (share ≥ and loss ≤, one strictly), by share."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def best_share(points: Sequence[Point], max_loss: float) -> float | None:
    """The largest share served among points that lose at most `max_loss` (None: no point does)."""
    shares = [s for s, loss in points if loss <= max_loss]
    return max(shares) if shares else None


def dominates(front: Sequence[Point], other: Sequence[Point]) -> bool:
    """True when every point of `other` is matched or beaten by a point of `front` (share ≥ and loss ≤)."""
    return all(any(f[0] >= o[0] - 1e-9 and f[1] <= o[1] + 1e-9 for f in front) for o in other)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (method, setting, seed): share served, adherence lost, velocity fidelity, seconds."""
    lines = ["| method | setting | seed | share served | adherence lost (points) | velocity fidelity | s/sample |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['seed']} | {100 * r['share']:.1f} % | {r['loss']:.2f} | "
                     f"{r.get('velocity', float('nan')):.4f} | {r.get('seconds', float('nan')):.2f} |")
    return "\n".join(lines)


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, max_loss: float = 1.0) -> Path:
    """PNG: share of layer-steps served (x) vs adherence points lost (y), the mean over seeds of every setting of
    every method, its Pareto front drawn as a line, and the quality budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, pts in mean_points(rows).items():
        xs, ys = [100 * p["share"] for p in pts], [p["loss"] for p in pts]
        sc = ax.scatter(xs, ys, s=18, alpha=0.6)
        front = pareto([(p["share"], p["loss"]) for p in pts])
        ax.plot([100 * s for s, _ in front], [loss for _, loss in front], marker="o", color=sc.get_facecolor()[0],
                label=method)
    ax.axhline(max_loss, color="grey", ls="--", lw=1, label=f"{max_loss:g} point budget")
    ax.set_xlabel("share of layer-steps served approximately (%)")
    ax.set_ylabel("adherence lost vs exact (points)")
    ax.set_title("routing: calibrated plan vs learned policy (held-out prompts, mean over seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
