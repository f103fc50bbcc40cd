"""Step caching on the testbed: diffusers' First Block Cache on the transformer, counted.

`--step-cache fbcache:THRESHOLD` (e.g. `fbcache:0.05`) applies diffusers' `FirstBlockCacheConfig(threshold)`
with `apply_first_block_cache` to the testbed's `FluxTransformer2DModel`: each call runs the first block, and
when its residual changed by less than THRESHOLD (relative mean absolute difference) since the last computed
step, the remaining blocks are skipped and their cached residual added instead. It composes with attnplug's
`apply()` — the cache hooks the blocks' forward, attnplug the attention processors inside them — so a
skipped step runs one block's attention (served by whichever backend serves it) and no other.

`StepCachedModel` wraps a `TestbedModel` for `sampling.sample`: it opens diffusers' cache context around
every call (the hooks need one), starts a fresh cache at each trajectory's first step, and counts the
steps whose remaining blocks were skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("fbcache",)
_LEADER_HOOK = "fbc_leader_block_hook"  # diffusers' name of the First Block Cache hook on the first block


class StepCacheError(ValueError):
    """A bad `--step-cache` spec or a diffusers without the cache; one line."""


@dataclass(frozen=True)
class StepCacheSpec:
    kind: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"


def parse_step_cache(spec: str) -> StepCacheSpec:
    """`fbcache:THRESHOLD` (THRESHOLD > 0) → `StepCacheSpec`; `StepCacheError` naming the problem."""
    kind, sep, value = spec.partition(":")
    if kind not in KINDS or not sep:
        raise StepCacheError(f"--step-cache {spec!r}: expected one of {', '.join(k + ':THRESHOLD' for k in KINDS)}")
    try:
        threshold = float(value)
    except ValueError:
        raise StepCacheError(f"--step-cache {spec!r}: THRESHOLD must be a number") from None
    if not threshold > 0 or threshold == float("inf"):
        raise StepCacheError(f"--step-cache {spec!r}: THRESHOLD must be a positive number")
    return StepCacheSpec(kind, threshold)


def available() -> str | None:
    """Why diffusers' First Block Cache cannot be used here, or None when it can."""
    try:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache  # noqa: F401
    except ImportError as exc:
        return f"this diffusers has no First Block Cache ({exc}); it came with diffusers 0.33"
    return None


class StepCachedModel:
    """A testbed model with First Block Cache on its transformer; `velocity` as the model's, plus counts.

    `steps` / `skipped`: calls made and calls whose remaining blocks the cache skipped (over every trajectory
    sampled since construction). A trajectory starts when sigma does not decrease from one call to the next."""

    def __init__(self, model: Any, spec: StepCacheSpec | str) -> None:
        why = available()
        if why:
            raise StepCacheError(why)
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

        self.spec = parse_step_cache(spec) if isinstance(spec, str) else spec
        self.model = model
        self.transformer = model.transformer
        apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=self.spec.threshold))
        first = self.transformer.transformer_blocks[0]
        self._leader = HookRegistry.check_if_exists_or_initialize(first).get_hook(_LEADER_HOOK)
        self._last_sigma: float | None = None
        self.steps = 0
        self.skipped = 0
        self.trajectories = 0
        self._removed = False

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor | float, prompts: torch.Tensor) -> torch.Tensor:
        s = float(sigma if not isinstance(sigma, torch.Tensor) else sigma.flatten()[0])
        if self._last_sigma is None or s >= self._last_sigma:
            self._reset()
        self._last_sigma = s
        with self.transformer.cache_context("cond"):
            v = self.model.velocity(x_t, sigma, prompts)
            skipped = not self._leader.state_manager.get_state().should_compute
        self.steps += 1
        self.skipped += int(skipped)
        return v

    def _reset(self) -> None:
        """A fresh cache: the next call computes every block."""
        self.transformer._reset_stateful_cache()
        self.trajectories += 1

    def parameters(self) -> Any:
        return self.model.parameters()

    def remove(self) -> None:
        """Take the cache hooks off the transformer (once; later calls do nothing)."""
        if self._removed:
            return
        self._removed = True
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK

        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.remove_hook(_LEADER_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)

    def report(self) -> dict[str, Any]:
        """JSON-able counts: spec, calls, skipped, the share skipped and the speed-up bound steps / computed."""
        computed = self.steps - self.skipped
        return {"spec": str(self.spec), "steps": self.steps, "skipped": self.skipped,
                "share_skipped": self.skipped / max(self.steps, 1), "trajectories": self.trajectories,
                "step_speedup_bound": self.steps / max(computed, 1)}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown rows of `attnplug eval --step-cache` results: adherence against exact without a cache, steps
    skipped, the bound steps / computed on the speed-up."""
    lines = [("| testbed | seed | prompts | backend | step cache | adherence exact, no cache → this | drop, points | "
              "steps skipped | steps / computed | velocity cos |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sc = r.get("step_cache") or {"spec": "none", "skipped": 0, "steps": 0, "share_skipped": 0.0,
                                     "step_speedup_bound": 1.0}
        lines.append(f"| {r.get('testbed', 'default')} | {r.get('seed', '–')} | {r.get('n_prompts', '–')} | "
                     f"{r['backend']} | {sc['spec']} | "
                     f"{100 * r['adherence_exact']:.2f} → {100 * r['adherence_approx']:.2f} | "
                     f"{r['adherence_drop_points']:+.2f} | {sc['skipped']}/{sc['steps']} "
                     f"({100 * sc['share_skipped']:.0f} %) | {sc['step_speedup_bound']:.2f}× | "
                     f"{r['velocity_cosine']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m attnplug.testbed.step_cache DIR`: the table of every `*.json` result of `attnplug eval` in DIR."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m attnplug.testbed.step_cache DIR", file=sys.stderr)
        return 2
    results = [json.loads(p.read_text()) for p in sorted(Path(args[0]).glob("*.json"))]
    print(table(results), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
