"""Attention statistics of the trained testbed: why some layers resist the ttr + landmark approximation.

Samples the exact testbed on a few held-out prompts with its transformer routed through attnplug's
diffusers host (exact `host` backend: the output is the unpatched model's), and at a few sampler steps
takes every attention layer's q and k exactly as the attention sees them (after the QK norms and
RoPE, text tokens first). From them it computes the softmax attention of the image-token queries and,
averaged over batch, heads and image-token queries:

- `entropy` (nats) and `entropy_ratio` = entropy / log(N keys) (1 = uniform, 0 = one key);
- `text_mass`: attention mass on the conditioning (text) tokens, and `own_text_mass` on the one
  text token of the query's own cell (the prompt's instruction for that cell);
- `local_r{r}`: mass on the image keys within Chebyshev distance r of the query on the token grid
  (r = 1, 2, 4: 3×3, 5×5, 9×9 windows, clipped at the border), `cell_mass`: mass inside the query's
  own 4×4-token cell;
- `landmark_mass`: mass on the landmark keys, chosen by `plugins.landmark.selection.select_landmarks`
  with the landmark settings of the layer these statistics were measured for (`STATS_LANDMARKS`: the
  previous default — every text token + 8 % of the image tokens, even layout: 64 + 82 keys here),
  i.e. what the exact residual branch of that ttr layer sees;
- `landmark_local_r{r}`: mass on the union of the landmarks and the local window of radius r (what an
  extra exact local-window branch would add to the landmarks);
- `top{k}`: mass of the k largest attention weights of each query (k = 16, 64).

Run: `python -m attnplug.testbed.attention_stats --prompts 4 --json OUT.json` (about 100 s on
2 CPU cores). The results are in docs/QUALITY.md ("Why some layers resist the approximation").
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import AttentionCall, Session
from ..plugins.landmark.selection import select_landmarks
from ..plugins.landmark.settings import PREVIOUS_DEFAULTS, LandmarkSettings
from . import data, sampling
from .model import load_testbed

DEFAULT_STEPS: tuple[int, ...] = (0, 5, 10, 15, 19)
DEFAULT_RADII: tuple[int, ...] = (1, 2, 4)
DEFAULT_TOPK: tuple[int, ...] = (16, 64)
#: Image tokens per cell side (an 8-pixel digit cell after 2×2 packing).
CELL_TOKENS = data.DIGIT_PX // data.PATCH


def metric_names(radii: Sequence[int] = DEFAULT_RADII, topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """The metric keys `attention_metrics` returns, in table order."""
    return (["entropy", "entropy_ratio", "text_mass", "own_text_mass"]
            + [f"local_r{r}" for r in radii] + ["cell_mass", "landmark_mass"]
            + [f"landmark_local_r{r}" for r in radii] + [f"top{k}" for k in topk])


#: The landmarks the statistics are measured against: those of the layer docs/QUALITY.md's table explains
#: (the previous product default, which testbed/weights/ttr_default.safetensors was trained with),
#: pinned so that the table stays reproducible when the plugin's defaults move.
STATS_LANDMARKS = LandmarkSettings(**PREVIOUS_DEFAULTS)


def landmark_indices(n_keys: int, n_cond: int, grid: tuple[int, int] | None = None,
                     settings: LandmarkSettings | None = None) -> torch.Tensor:
    """Landmark key indices `[L]` exactly as the landmark backend picks them for an unmasked call.

    `LandmarkBackend.indices` calls `select_landmarks(n_keys, n_cond, s.fraction, s.min, s.max, s.layout,
    call.latent_grid)`; `STATS_LANDMARKS` (0.08, 64, 0, "even") gives all 64 text tokens + 82 image tokens here.
    """
    s = settings or STATS_LANDMARKS
    idx, _ = select_landmarks(n_keys, n_cond, s.fraction, s.min, s.max, s.layout, grid)
    return idx


def _image_geometry(grid: tuple[int, int], cell: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chebyshev distances `[Ni, Ni]` between image tokens (row-major grid) and their cell ids `[Ni]`."""
    h, w = grid
    pos = torch.arange(h * w)
    r, c = pos // w, pos % w
    dist = torch.maximum((r[:, None] - r[None, :]).abs(), (c[:, None] - c[None, :]).abs())
    cells = None if cell is None else (r // cell) * (w // cell) + c // cell
    return dist, cells


@functools.lru_cache(maxsize=8)
def _mass_masks(n_cond: int, grid: tuple[int, int], cell: int | None, landmarks: tuple[int, ...],
                radii: tuple[int, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The key sets of the "mass on a set of keys" metrics: names and float masks `[Ni, N, M]`.

    Column m of query row i marks the keys of metric `names[m]` for image query i (text tokens first).
    `own_text_mass` only when the text tokens are one per cell (row-major), `cell_mass` only with a cell.
    """
    h, w = grid
    n_img = h * w
    n_keys = n_cond + n_img
    dist, cells = _image_geometry(grid, cell)
    is_lm = torch.zeros(n_keys, dtype=torch.bool)
    is_lm[list(landmarks)] = True
    columns: dict[str, torch.Tensor] = {}
    text = torch.zeros(n_keys, dtype=torch.bool)
    text[:n_cond] = True
    columns["text_mass"] = text.expand(n_img, -1)
    if cells is not None and cell is not None and n_cond == (h // cell) * (w // cell):
        own = torch.zeros(n_img, n_keys, dtype=torch.bool)
        own[torch.arange(n_img), cells] = True  # text token i is cell i
        columns["own_text_mass"] = own
    for r in radii:
        win = torch.zeros(n_img, n_keys, dtype=torch.bool)
        win[:, n_cond:] = dist <= r
        columns[f"local_r{r}"] = win
        columns[f"landmark_local_r{r}"] = win | is_lm
    if cells is not None:
        same_cell = torch.zeros(n_img, n_keys, dtype=torch.bool)
        same_cell[:, n_cond:] = cells[:, None] == cells[None, :]
        columns["cell_mass"] = same_cell
    columns["landmark_mass"] = is_lm.expand(n_img, -1)
    return tuple(columns), torch.stack(list(columns.values()), -1).to(torch.float32)


@torch.no_grad()
def attention_metrics(q: torch.Tensor, k: torch.Tensor, n_cond: int, grid: tuple[int, int], *,
                      cell: int | None = CELL_TOKENS, landmarks: torch.Tensor | None = None,
                      radii: Sequence[int] = DEFAULT_RADII, topk: Sequence[int] = DEFAULT_TOPK,
                      scale: float | None = None) -> dict[str, float]:
    """Statistics of softmax(q kᵀ · scale) over the image-token queries, averaged over batch, heads, queries.

    :param q: `[B, H, N, D]` queries, conditioning tokens first (attnplug's convention).
    :param k: `[B, H, N, D]` keys in the same order.
    :param n_cond: conditioning tokens at the front; the `h * w` tokens after them are the image grid.
    :param grid: `(h, w)` of the image-token grid (row-major).
    :param cell: side in tokens of a square cell (the query's own cell: `cell_mass`; when the text
        tokens are one per cell in row-major order, `own_text_mass` is the mass on the query cell's
        text token). None: both are NaN.
    :param landmarks: landmark key indices `[L]` (default: `landmark_indices` for this shape).
    :param scale: softmax scale (default `1/sqrt(D)`, as SDPA and attnplug's backends).
    :return: `{metric: value}` with the keys of `metric_names(radii, topk)`.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"attention_metrics: q and k must be [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    h, w = grid
    n_keys = k.shape[2]
    n_img = h * w
    if n_cond + n_img != n_keys or q.shape[2] != n_keys:
        raise ValueError(f"attention_metrics: {n_cond} text + {h}x{w} image tokens != {n_keys} keys "
                         f"({q.shape[2]} queries)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if landmarks is None:
        landmarks = landmark_indices(n_keys, n_cond, grid)
    names, masks = _mass_masks(n_cond, (h, w), cell, tuple(landmarks.tolist()), tuple(radii))
    masks = masks.to(q.device)
    kmax = min(max(topk), n_keys) if topk else 0

    sums: dict[str, float] = {name: 0.0 for name in metric_names(radii, topk)}
    rows = 0
    for b in range(q.shape[0]):  # one batch element at a time bounds the [H, Ni, N] temporaries
        qi = q[b, :, n_cond:].float()
        logits = torch.einsum("hqd,hkd->hqk", qi, k[b].float()) * scale
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        p = logp.exp()
        rows += p.shape[0] * p.shape[1]
        sums["entropy"] += float(-(p * logp).sum())
        del logp
        # the key sets do not depend on the head: sum the heads first, then one batched product
        for name, v in zip(names, torch.bmm(p.sum(0).unsqueeze(1), masks).sum((0, 1)).tolist()):
            sums[name] += v
        if kmax:
            top = p.topk(kmax, dim=-1).values.sum((0, 1))  # sorted: the first kk are the top kk
            cum = top.cumsum(0)
            for kk in topk:
                sums[f"top{kk}"] += float(cum[min(kk, n_keys) - 1])
    out = {name: v / rows for name, v in sums.items()}
    out["entropy_ratio"] = out["entropy"] / math.log(n_keys)
    for name in ("own_text_mass", "cell_mass"):
        if name not in names:
            out[name] = float("nan")
    return out


class StatsSession(Session):
    """An exact attnplug session that measures `attention_metrics` on the calls of chosen steps.

    The call is then served as usual (backend and exact = `host`: diffusers' own attention), so the
    sampled trajectory is the unpatched model's.
    """

    def __init__(self, steps: Sequence[int], radii: Sequence[int] = DEFAULT_RADII,
                 topk: Sequence[int] = DEFAULT_TOPK) -> None:
        super().__init__({"backend": "host", "exact": "host", "loggers": []})
        self.capture_steps = set(steps)
        self.radii = tuple(radii)
        self.topk = tuple(topk)
        self.results: dict[str, dict[int, dict[str, float]]] = {}
        self.landmark_count: int | None = None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                  mask: torch.Tensor | None = None, host_attention: Any = None) -> torch.Tensor:
        if call.step_index in self.capture_steps and mask is None:
            grid = call.latent_grid
            if grid is None or grid[0] * grid[1] != call.n_image_tokens:
                side = math.isqrt(call.n_image_tokens)
                grid = (side, side)
            lm = landmark_indices(k.shape[2], call.n_cond_tokens, call.latent_grid)
            self.landmark_count = int(lm.numel())
            self.results.setdefault(call.layer_key, {})[int(call.step_index)] = attention_metrics(
                q, k, call.n_cond_tokens, grid, landmarks=lm, radii=self.radii, topk=self.topk)
        return super().attention(q, k, v, call, mask, host_attention)


def _layer_order(key: str) -> tuple[int, int]:
    kind, _, idx = key.partition(":")
    return ({"double": 0, "single": 1}.get(kind, 2), int(idx) if idx.isdigit() else 0)


def collect(n_prompts: int = 4, steps: Sequence[int] = DEFAULT_STEPS, sample_steps: int = 20, seed: int = 0,
            device: str = "cpu", weights: str | Path | None = None) -> dict[str, Any]:
    """Sample the exact testbed on `n_prompts` held-out prompts and measure every layer at `steps`.

    Returns a JSON-able dict: settings, `per_step` {layer: {step: metrics}}, `mean` {layer: metrics
    averaged over the measured steps}.
    """
    from ..hosts.diffusers import apply

    model = load_testbed(device, path=weights)
    prompts = data.heldout_prompts(n_prompts, seed=seed + 1234)
    noise = sampling.initial_noise(n_prompts, prompts.shape[1], seed=seed)
    session = StatsSession(steps)
    t0 = time.perf_counter()
    with apply(model.transformer, session):
        sampling.sample(model, prompts, noise, steps=sample_steps)
    seconds = time.perf_counter() - t0
    session.close()
    layers = sorted(session.results, key=_layer_order)
    per_step = {key: {str(s): m for s, m in sorted(session.results[key].items())} for key in layers}
    mean = {key: {name: sum(m[name] for m in session.results[key].values()) / len(session.results[key])
                  for name in metric_names(session.radii, session.topk)} for key in layers}
    return {"n_prompts": n_prompts, "sample_steps": sample_steps, "steps_measured": sorted(set(steps)),
            "seed": seed, "device": device, "landmarks": session.landmark_count,
            "queries": "image tokens", "seconds": seconds, "per_step": per_step, "mean": mean}


# ------------------------------------------------------------------------------------------------- tables

#: Short column titles for the tables.
SHORT = {"entropy": "H nats", "entropy_ratio": "H/logN", "text_mass": "text", "own_text_mass": "own txt",
         "local_r1": "win r1", "local_r2": "win r2", "local_r4": "win r4", "cell_mass": "cell",
         "landmark_mass": "landmk", "landmark_local_r1": "lm∪r1", "landmark_local_r2": "lm∪r2",
         "landmark_local_r4": "lm∪r4", "top16": "top16", "top64": "top64"}
PER_STEP_METRICS: tuple[str, ...] = ("entropy_ratio", "text_mass", "local_r2", "landmark_mass",
                                     "landmark_local_r2", "top16")


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def markdown_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str], first: str = "layer") -> str:
    """A markdown table: one row per key of `rows`, one column per metric."""
    head = f"| {first} | " + " | ".join(SHORT.get(m, m) for m in metrics) + " |"
    sep = "|---|" + "---|" * len(metrics)
    body = [f"| {key} | " + " | ".join(_fmt(vals[m]) for m in metrics) + " |" for key, vals in rows.items()]
    return "\n".join([head, sep, *body])


def report(result: Mapping[str, Any]) -> str:
    """Both tables: every layer averaged over the measured steps, and the single blocks per step."""
    names = list(next(iter(result["mean"].values())))
    per_step_rows = {f"{key} @{s}": m for key, steps in result["per_step"].items() if key.startswith("single")
                     for s, m in steps.items()}
    return (f"Mean over steps {result['steps_measured']} ({result['n_prompts']} prompts, image-token queries, "
            f"{result['landmarks']} landmarks):\n\n" + markdown_table(result["mean"], names)
            + "\n\nSingle blocks per step:\n\n" + markdown_table(per_step_rows, PER_STEP_METRICS, "layer @step"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnplug.testbed.attention_stats",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts (one batch)")
    ap.add_argument("--steps", type=str, default=",".join(map(str, DEFAULT_STEPS)),
                    help="sampler steps to measure, comma-separated (of --sample-steps)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default=None, help="testbed weights (default: the committed ones)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    result = collect(args.prompts, steps, args.sample_steps, args.seed, args.device, args.weights)
    print(report(result))
    print(f"\nsampling + measurement: {result['seconds']:.1f} s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
