"""Evaluate an attnplug config/checkpoint on the testbed: adherence, fidelity, layers served, speed.

Two copies of the trained model from the same weights: `exact` (untouched) and `approx` (its
transformer patched by attnplug's diffusers host with the config under test). Both sample the same
held-out prompts from the same noise; then:

- adherence: share of cells the digit classifier reads as the prompted digit (both models);
- fidelity per step: the approximate velocity against the exact one from the same x_t on the exact
  trajectory (cosine and relative error) — isolates the approximation;
- fidelity per trajectory: PSNR of the final approximate sample against the exact sample;
- per layer: output cosine and relative L2 of every served attention call against exact attention on
  the same inputs (the session's `shadow_exact`), measured during the fidelity pass;
- which layers the approximate backend served (from the session's per-layer stats), time per step.

`testbed` names the registry's model (`testbed/registry.py`; a checkpoint distilled on another testbed of the
family serves here: resolution transfer); `step_cache` (`fbcache:THRESHOLD`) puts diffusers' First Block Cache
on the approximate model's transformer as well (`testbed/step_cache.py`) and reports the steps it skipped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch

from . import classifier, data, sampling
from .model import TestbedModel, load_testbed


def _timed_sample(model: Any, prompts: torch.Tensor, noise: torch.Tensor, steps: int,
                  batch_size: int | None) -> tuple[torch.Tensor, float]:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    images = sampling.sample(model, prompts, noise, steps=steps, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, (time.perf_counter() - t0) / steps


def evaluate(config: "str | Path | Mapping[str, Any]", checkpoint: str | Path | None = None, *,
             n_prompts: int = 16, steps: int = 20, seed: int = 0, device: str = "cpu",
             batch_size: int | None = 8, weights: str | Path | None = None,
             dtype: torch.dtype = torch.float32, reference: dict[str, Any] | None = None,
             testbed: str | None = None, step_cache: str | None = None) -> dict[str, Any]:
    """Evaluate `config` (with `checkpoint` loaded, training forced off) on `n_prompts` held-out prompts, both models
    in `dtype` (bf16 on a GPU: the attention calls a served layer sees are bf16, as in a real model).

    Returns a JSON-able dict of metrics plus `images` ({"exact", "approx"} tensors [B, 1, 8G, 8G]),
    which callers pop before writing JSON. `reference`: a dict the caller keeps between evaluations of the
    same prompts, steps, seed, device and weights; the exact model's samples and trajectory are computed into
    it once and reused (several servings of one checkpoint then cost one exact pass, not one each).
    `testbed`: the registry's testbed (None: the default); `weights` overrides its file. `step_cache`: a
    `step_cache.parse_step_cache` spec applied to the approximate model (the exact one never caches).
    """
    from ..core import Session
    from ..core.config import load_config
    from ..hosts.diffusers import apply

    from .step_cache import StepCachedModel, parse_step_cache
    from .transfer import check_fits

    cache_spec = parse_step_cache(step_cache) if step_cache else None
    cfg = load_config(config)
    cfg.root = cfg.root.model_copy(update={"training": False, "checkpoint": None})
    session = Session(cfg)
    if checkpoint is not None:
        session.load(checkpoint)  # a bad checkpoint is refused before any model is loaded
    reference = {} if reference is None else reference
    key = (n_prompts, steps, seed, device, batch_size, str(weights), str(dtype), testbed)
    if reference.get("key") not in (None, key):
        raise ValueError(f"evaluate: the reference was computed for (prompts, steps, seed, device, batch, weights, "
                         f"dtype, testbed) {reference['key']}, this evaluation is {key}")
    exact = reference.get("model") or load_testbed(device, dtype=dtype, path=weights, testbed=testbed)
    if checkpoint is not None:
        check_fits(checkpoint, exact.cfg, f"testbed {testbed or 'default'!r}")
    approx = load_testbed(device, dtype=dtype, path=weights, testbed=testbed)
    prompts = data.heldout_prompts(n_prompts, exact.cfg.grid, seed=seed + 1234)
    noise = sampling.initial_noise(n_prompts, prompts.shape[1], seed=seed)

    handle = apply(approx.transformer, session)
    cached = StepCachedModel(approx, cache_spec) if cache_spec is not None else None
    try:
        if "images" not in reference:
            reference.update(key=key, model=exact)
            reference["images"], reference["step_s"] = _timed_sample(exact, prompts, noise, steps, batch_size)
        exact_images, exact_step_s = reference["images"], reference["step_s"]
        approx_images, approx_step_s = _timed_sample(cached or approx, prompts, noise, steps, batch_size)
        session.run_end()
        if cached is not None:  # velocity fidelity: the attention approximation alone, on every step
            cache_report = cached.report()
            cached.remove()
        served = _served_layers(session)
        calls_share = _share_calls_served(session)
        session.config.root.shadow_exact = True  # per-layer output fidelity, measured in the fidelity pass only
        if "trajectory" not in reference:
            reference["trajectory"] = sampling.reference_trajectory(exact, prompts, noise, steps=steps)
        fidelity = sampling.velocity_fidelity(exact, approx, prompts, noise, steps=steps,
                                              trajectory=reference["trajectory"])
        session.run_end()
        per_layer = {k: s.to_json()["fidelity"] for k, s in sorted(session.stats.items()) if s.shadow_calls}
    finally:
        if cached is not None:
            cached.remove()
        handle.remove()
        session.close()

    learned = session.learned_backends()
    ready = sorted({k for b in learned.values() for k, r in b.ready.items() if r})
    all_layers = sorted(session.stats)
    result: dict[str, Any] = {
        "backend": cfg.root.backend,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "n_prompts": n_prompts, "steps": steps, "seed": seed, "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "adherence_exact": classifier.adherence(exact_images, prompts),
        "adherence_approx": classifier.adherence(approx_images, prompts),
        "psnr_db": float(sampling.psnr(approx_images, exact_images).mean()),
        "velocity_cosine": fidelity["cosine_mean"],
        "velocity_rel_error": fidelity["rel_error_mean"],
        "velocity_cosine_per_step": fidelity["cosine"],
        "layers": all_layers,
        "layers_ready": ready,
        "layers_served": served,
        "share_layers_served": len(served) / max(len(all_layers), 1),
        "share_calls_served": calls_share,
        "per_layer_fidelity": per_layer,
        "seconds_per_step_exact": exact_step_s,
        "seconds_per_step_approx": approx_step_s,
        "testbed": testbed or "default",
        "image_tokens": approx.num_image_tokens,
        "step_cache": cache_report if cached is not None else None,
        "images": {"exact": exact_images, "approx": approx_images},
    }
    result["adherence_drop_points"] = 100.0 * (result["adherence_exact"] - result["adherence_approx"])
    return result


def _approx_calls(session: Any, stats: Any) -> int:
    """How many of a layer's calls an approximate (non-exact) backend served."""
    return sum(n for name, n in stats.served.items() if not session.backends.get(name).capabilities.exact)


def _served_layers(session: Any) -> list[str]:
    """Layers where an approximate (non-exact) backend served at least 90 % of the calls."""
    return sorted(key for key, stats in session.stats.items()
                  if stats.calls and _approx_calls(session, stats) >= 0.9 * stats.calls)


def _share_calls_served(session: Any) -> float:
    """Share of all attention calls (every layer, step and batch) an approximate backend served."""
    calls = sum(stats.calls for stats in session.stats.values())
    return sum(_approx_calls(session, stats) for stats in session.stats.values()) / max(calls, 1)


def strip_images(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result without its image tensors (for JSON)."""
    return {k: v for k, v in result.items() if k != "images"}
