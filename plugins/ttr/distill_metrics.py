"""Quality metrics of the online distiller: per layer, and cross-layer snapshots.

Per layer (from one update's student and teacher outputs on the sampled queries, `[B, H, nq, D]`):
- `nmse`: ||student − teacher||² / ||teacher||² over the whole subset;
- `cos_mean`, `cos_p5`: cosine similarity per token and head over the head dimension (never over a
  flattened tensor, where large easy regions hide hard tokens), mean and 5th percentile;
- `rel_l2_p95`, `rel_l2_p99`: per-token-and-head relative L2 error ||s − t|| / ||t||, tail quantiles;
- `norm_ratio`: mean ||s|| / mean ||t|| (a student that shrinks its output shows here first).

Attention-level metrics (on `n` sampled queries of the subset, exact softmax rows computed here from
q and the full K with scale D^-0.5 and the key mask):
- `attn_entropy`: mean entropy (nats) of the exact rows — how peaked the teacher is;
- when the student backend exposes `attention_weights(layer_key, q, k, call, mask) -> [B, H, n, Nk]`
  (rows summing to 1, e.g. the kernel weights φ(q)·φ(k) / Σ φ(q)·φ(k)): `attn_kl` = mean KL(exact ‖
  student) and `attn_topk` = mean overlap |top-k(exact) ∩ top-k(student)| / k. Without that method
  these two are not reported (nothing else the generic distiller could compute would mean the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

QUANTILES = (("min", 0.0), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("max", 1.0))


@torch.no_grad()
def output_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Output-level metrics of one update (see the module docstring). Inputs `[B, H, nq, D]`."""
    s, t = student.detach().float(), teacher.detach().float()
    diff = s - t
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8).flatten()
    t_norm = t.norm(dim=-1).flatten()
    rel = diff.norm(dim=-1).flatten() / t_norm.clamp_min(1e-8)
    vals = torch.stack(
        [
            diff.pow(2).sum() / t.pow(2).sum().clamp_min(1e-12),
            cos.mean(),
            torch.quantile(cos, 0.05),
            torch.quantile(rel, 0.95),
            torch.quantile(rel, 0.99),
            s.norm(dim=-1).mean() / t_norm.mean().clamp_min(1e-12),
        ]
    ).tolist()
    return dict(zip(("nmse", "cos_mean", "cos_p5", "rel_l2_p95", "rel_l2_p99", "norm_ratio"), vals))


def sample_queries(nq: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`min(n, nq)` distinct query indices, sorted (seeded)."""
    n = min(n, nq)
    return torch.randperm(nq, generator=generator)[:n].sort().values


@torch.no_grad()
def exact_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Exact softmax attention rows `[B, H, n, Nk]` (fp32, scale D^-0.5, key mask `[B, Nk]` True = attend)."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * (q.shape[-1] ** -0.5)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :].to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def attention_metrics(exact: torch.Tensor, student: torch.Tensor | None, top_k: int) -> dict[str, float]:
    """Entropy of the exact rows; with student rows also KL(exact ‖ student) and top-k overlap."""
    p = exact.float()
    logp = torch.log(p.clamp_min(1e-30))
    out = {"attn_entropy": float(-(p * logp).sum(-1).mean())}
    if student is not None:
        if student.shape != p.shape:
            raise ValueError(
                f"attention_weights returned shape {tuple(student.shape)}, expected {tuple(p.shape)}"
            )
        qrow = student.float().clamp_min(1e-30)
        qrow = qrow / qrow.sum(-1, keepdim=True)
        out["attn_kl"] = float((p * (logp - torch.log(qrow))).sum(-1).mean())
        k = max(1, min(top_k, p.shape[-1]))
        tp = p.topk(k, dim=-1).indices
        ts = qrow.topk(k, dim=-1).indices
        hit = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, tp, True).gather(-1, ts)
        out["attn_topk"] = float(hit.float().sum(-1).mean() / k)
    return out


def cross_layer_snapshot(
    per_layer: Mapping[str, Mapping[str, float]], keys: Iterable[str]
) -> dict[str, float]:
    """Quantiles (min/p25/p50/p75/max) across layers of each metric in `keys`; non-finite values are
    skipped and a metric with no finite value is left out (never NaN in logs)."""
    out: dict[str, float] = {}
    for key in keys:
        values = [
            float(m[key])
            for m in per_layer.values()
            if key in m and m[key] is not None and math.isfinite(float(m[key]))
        ]
        if not values:
            continue
        t = torch.tensor(values, dtype=torch.float64)
        for name, q in QUANTILES:
            out[f"{key}/{name}"] = float(torch.quantile(t, q))
    return out
