"""Per-pass tile sweep of the fused ttr kernels on the current GPU (how `KernelConfig`'s defaults are chosen).

`python -m attnplug.bench.tune [--sizes 1024,2048] [--quick] [--parts key,query,landmark]` runs the
product's default layer (`bench.default_layer`: φ, landmarks and window from the settings' defaults, adaptive
α) in bf16 and sweeps each part over its own grid of `KernelConfig` fields, every other field at its default:

- key: the key pass alone (`ServePlan.key_state`) over kv_block_n × kv_warps × kv_stages ×
  kv_hidden_chunk × kv_programs_per_sm;
- query: the kernel-only call (`ttr_forward_fused` without landmarks) over q_block_m × q_warps ×
  q_stages × q_hidden_chunk. The whole call is timed: it includes the key pass at its default tiles;
- landmark: the whole call with the in-kernel landmark softmax (landmark_impl="fused") over
  lm_block_m × lm_warps × lm_stages × lm_block × lm_window_block × lm_patch_w × lm_hidden_chunk (the
  landmark pass; lm_window_block and lm_patch_w only matter with a window). It includes the key pass at its
  default tiles (and adaptive pass 2 where the layer normalises d by the call's mean, `alpha_reference = "call"`);
- landmark-sdpa (only when named in `--parts`): the landmark pass with cuDNN landmarks (landmark_impl="sdpa"),
  whose softmax it continues over the window — the path `auto` takes at 4096² — over sdpa_lm_block_m ×
  sdpa_lm_warps × sdpa_lm_window_block and the shared lm_* fields; its best overrides landmark's shared fields in the
  combined config;
- landmark-tma (only when named in `--parts`): the whole call with the TMA-fed landmark softmax
  (landmark_impl="tma", kernels/tma_landmarks.py) over tma_block_m × tma_block × tma_warps × tma_stages; the
  landmark pass after it takes the sdpa_lm_* tiles; the whole rows then also time "tma";
- joint, joint-sdpa (only when named in `--parts`): the joint layer's whole call (`LayerInputs.joint`: a double
  block's, text rows exact, far field image↔image) with in-kernel or cuDNN landmarks, over the joint query pass's
  joint_block_m × joint_warps × lm_stages × joint_window_block × lm_hidden_chunk (and joint_lm_block for
  in-kernel landmarks); their best combine apart from the hybrid layer's parts, which share lm_stages and
  lm_hidden_chunk;
- whole: the default config and the one combining each part's best, as whole calls with
  landmark_impl "fused" and "sdpa" (and the joint layer's, when a joint part was swept).

One line per config: the median of CUDA-event timings (`bench.run.time_ms`), in ms. A config that
fails (one that does not compile, e.g. out of shared memory) is skipped with a line on stderr. At the
end, per size: the best config of each part, the combined `KernelConfig` and the whole-call times.
`--quick` sweeps grids about a third the size. `--precompile N` first runs N processes that each call (without
timing) every N-th config of the same sweep, so that Triton compiles the kernels in parallel into its on-disk
cache; the timed sweep that follows then loads them (a sweep's time is mostly compiling, one config at a time).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

from ..plugins.ttr.kernels import KernelConfig
from ..plugins.ttr.kernels import ServePlan
from .default_layer import default_layer
from .run import time_ms

Grid = dict[str, list[int]]  # KernelConfig field -> values to try
#: part -> (full grid, --quick grid)
GRIDS: dict[str, tuple[Grid, Grid]] = {
    "key": ({"kv_block_n": [32, 64, 128], "kv_warps": [4, 8], "kv_stages": [2, 3],
             "kv_hidden_chunk": [0, 64, 128], "kv_programs_per_sm": [1, 2, 4, 8]},
            {"kv_block_n": [64, 128], "kv_warps": [8], "kv_stages": [2, 3], "kv_hidden_chunk": [0, 64, 128],
             "kv_programs_per_sm": [1, 2, 4]}),
    "query": ({"q_block_m": [64, 128], "q_warps": [4, 8], "q_stages": [1, 2, 3],
               "q_hidden_chunk": [0, 64, 128]},
              {"q_block_m": [64, 128], "q_warps": [4, 8], "q_stages": [2, 3], "q_hidden_chunk": [0, 64]}),
    "landmark": ({"lm_block_m": [64, 128], "lm_warps": [4, 8], "lm_stages": [1, 2, 3],
                  "lm_block": [32, 64, 128], "lm_window_block": [16, 32, 64], "lm_patch_w": [8, 16, 32],
                  "lm_hidden_chunk": [0, 64, 128]},
                 {"lm_block_m": [64, 128], "lm_warps": [4, 8], "lm_stages": [2, 3], "lm_block": [32, 64],
                  "lm_window_block": [16, 32]}),
    # the same pass, its landmark softmax read from cuDNN's result: its own rows and warps (sdpa_lm_*)
    "landmark-sdpa": ({"sdpa_lm_block_m": [32, 64, 128], "sdpa_lm_warps": [4, 8], "lm_stages": [2, 3],
                       "sdpa_lm_window_block": [16, 32, 64], "lm_patch_w": [8, 16, 32],
                       "lm_hidden_chunk": [0, 64, 128]},
                      {"sdpa_lm_block_m": [64, 128], "sdpa_lm_warps": [4, 8], "sdpa_lm_window_block": [16, 32],
                       "lm_hidden_chunk": [64, 128]}),
    # the TMA-fed landmark softmax (landmark_impl "tma"): its own tiles, then the landmark pass as after cuDNN's
    "landmark-tma": ({"tma_block_m": [64, 128], "tma_block": [32, 64, 128], "tma_warps": [4, 8],
                      "tma_stages": [2, 3, 4]},
                     {"tma_block_m": [64, 128], "tma_block": [64, 128], "tma_stages": [2, 3]}),
    # the joint layer's query pass (mode 5): φ(q) and the window's far-field terms live beside the softmax state
    "joint": ({"joint_block_m": [32, 64, 128], "joint_warps": [4, 8], "lm_stages": [1, 2, 3],
               "joint_lm_block": [32, 64, 128], "joint_window_block": [32, 64, 128], "lm_hidden_chunk": [0, 64, 128]},
              {"joint_block_m": [64, 128], "joint_warps": [4, 8], "lm_stages": [2, 3], "joint_lm_block": [64, 128],
               "joint_window_block": [32, 64]}),
    "joint-sdpa": ({"joint_block_m": [32, 64, 128], "joint_warps": [4, 8], "lm_stages": [1, 2, 3],
                    "joint_window_block": [32, 64, 128], "lm_hidden_chunk": [0, 64, 128]},
                   {"joint_block_m": [64, 128], "joint_warps": [4, 8], "joint_window_block": [32, 64],
                    "lm_hidden_chunk": [64, 128]}),
}
JOINT_PARTS = ("joint", "joint-sdpa")


def config_text(overrides: dict[str, int]) -> str:
    """`KernelConfig(...)` with only the overridden fields (copy-pasteable)."""
    return "KernelConfig(" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"


Shard = tuple[int, int]  # (index, count): a compile-only process calls every count-th config from index


def sweep(label: str, call: Callable[[KernelConfig], object], grid: Grid,
          device: torch.device, shard: Shard | None = None) -> list[tuple[float, dict[str, int]]]:
    """Median ms of `call(config)` for every point of `grid` (overrides of the default `KernelConfig`),
    one printed line each; a config that fails is skipped with a line on stderr. Returns (ms, overrides).
    With `shard`, only that shard's configs are called, once each and untimed (compiling them), and nothing
    is returned."""
    rows = []
    for i, values in enumerate(itertools.product(*grid.values())):
        if shard is not None and i % shard[1] != shard[0]:
            continue
        overrides = dict(zip(grid, values))
        fn = functools.partial(call, KernelConfig(**overrides))
        try:
            if shard is not None:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                continue
            ms = statistics.median(time_ms(fn, device, 2, 10, 100))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"{label} {config_text(overrides)}: {type(exc).__name__}: {str(exc)[:120]}",
                  file=sys.stderr)
            continue
        rows.append((ms, overrides))
        print(f"{label} {ms:8.3f} ms {config_text(overrides)}", flush=True)
    return rows


def tune_size(size: str, quick: bool, dev: torch.device, parts: list[str] | None = None,
              grids: dict[str, Grid] | None = None, shard: Shard | None = None) -> list[str]:
    """Sweep every part (or `parts`) at one size (lines printed as they come); returns the summary lines.
    With `shard`, only compile that shard's configs of each part's sweep (no timing, no summary)."""
    layer = default_layer(size, dev)

    def whole_call(landmark_impl: str | None, joint: bool = False) -> Callable[[KernelConfig], torch.Tensor]:
        """The whole layer call: kernel-only (None) or with landmarks (and the window) through `landmark_impl`,
        the hybrid layer's or (`joint`) the joint layer's, one serve plan per config (built at its first call: the
        timed calls are the launches)."""
        made: dict[KernelConfig, Callable[[], torch.Tensor]] = {}

        def call(cfg: KernelConfig) -> torch.Tensor:
            if cfg not in made:
                made[cfg] = layer.joint(cfg, landmark_impl) if joint else layer.fused(cfg, landmark_impl)
            return made[cfg]()
        return call

    key_plans: dict[KernelConfig, ServePlan] = {}

    def key_call(cfg: KernelConfig) -> object:
        """The key pass alone, from one plan per config."""
        if cfg not in key_plans:
            key_plans[cfg] = ServePlan(layer.k, layer.k, layer.v, layer.phi_k, layer.phi_k, config=cfg)
        return key_plans[cfg].key_state(layer.k, layer.v)

    calls = {"key": key_call, "query": whole_call(None),
             "landmark": whole_call("fused"), "landmark-sdpa": whole_call("sdpa"), "landmark-tma": whole_call("tma"),
             "joint": whole_call("fused", joint=True), "joint-sdpa": whole_call("sdpa", joint=True)}
    print(f"# {layer.description}; 'query' and 'landmark' time the whole call "
          "(key pass at default tiles; 'landmark' also adaptive pass 2 if α's d is against the call mean)",
          flush=True)
    summary: list[str] = []
    combined: dict[bool, dict[str, int]] = {False: {}, True: {}}  # joint? -> the best overrides combined
    swept = [part for part in calls if parts is None or part in parts]
    for part in swept:
        grid = (grids or {}).get(part) or GRIDS[part][int(quick)]
        rows = sweep(f"{size} {part}", calls[part], grid, dev, shard)
        if rows:
            ms, best = min(rows, key=lambda r: r[0])
            combined[part in JOINT_PARTS].update(best)
            summary.append(f"BEST {size} {part}: {ms:.3f} ms {config_text(best)}")
    if shard is not None:
        return summary
    for joint in (False, True):
        if joint and not set(swept) & set(JOINT_PARTS):
            continue
        tag = " joint" if joint else ""
        summary.append(f"COMBINED {size}{tag}: {config_text(combined[joint])}")
        for impl in ("fused", "sdpa") + (("tma",) if "landmark-tma" in swept else ()):
            for name, overrides in (("default", {}), ("combined", combined[joint])):
                one_point = {f: [x] for f, x in overrides.items()}
                rows = sweep(f"{size} whole{tag} {impl}-lm {name}", whole_call(impl, joint), one_point, dev)
                if rows:
                    summary.append(f"WHOLE {size}{tag} {impl}-lm {name}: {rows[0][0]:.3f} ms")
    return summary


def precompile(argv: list[str], workers: int) -> None:
    """Run `workers` compile-only processes of this same sweep side by side (each its shard) and wait for them;
    a worker that fails is reported and the timed sweep compiles what it left."""
    procs = [subprocess.Popen([sys.executable, "-m", __spec__.name, *argv, "--shard", f"{i}/{workers}"],
                              stdout=subprocess.DEVNULL) for i in range(workers)]
    for i, proc in enumerate(procs):
        if proc.wait() != 0:
            print(f"# precompile worker {i}/{workers} exited with {proc.returncode}", file=sys.stderr)


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less one option that takes a value (`NAME VALUE` or `NAME=VALUE`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 ≤ I < N."""
    index, count = (int(x) for x in text.split("/"))
    if not 0 <= index < count:
        raise ValueError(text)
    return index, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-tune")
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--quick", action="store_true", help="grids about a third the size")
    p.add_argument("--parts", default="key,query,landmark",
                   help=f"comma list of the parts to sweep ({', '.join(GRIDS)})")
    p.add_argument("--grid", default=None,
                   help='JSON {part: {KernelConfig field: [values]}} replacing those parts\' grids, e.g. '
                        '\'{"landmark": {"lm_patch_w": [8, 16, 32]}}\'')
    p.add_argument("--precompile", type=int, default=0, metavar="N",
                   help="first compile the sweep's kernels in N processes side by side, then time them")
    p.add_argument("--shard", default=None, metavar="I/N", help="(internal) compile only every N-th config from I")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    try:
        shard = parse_shard(a.shard) if a.shard else None
    except ValueError:
        p.error(f"--shard: expected I/N with 0 <= I < N, got {a.shard!r}")
    if a.precompile < 0:
        p.error(f"--precompile: expected a number of processes >= 0, got {a.precompile}")
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(GRIDS):
        p.error(f"--parts: expected some of {', '.join(GRIDS)}, got {a.parts!r}")
    grids = None
    if a.grid:
        try:
            grids = json.loads(a.grid)
            for part, grid in grids.items():
                if part not in GRIDS:
                    raise ValueError(f"unknown part {part!r}")
                KernelConfig(**{f: vals[0] for f, vals in grid.items()})  # unknown fields raise TypeError
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            p.error(f"--grid: expected JSON {{part: {{KernelConfig field: [values]}}}}, got {a.grid!r} ({exc})")
    dev = torch.device("cuda")
    if a.precompile and shard is None:
        precompile(without_option(argv, "--precompile"), a.precompile)
    summary = [line for size in a.sizes.split(",") for line in tune_size(size, a.quick, dev, parts, grids, shard)]
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
