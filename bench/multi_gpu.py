"""The multi-GPU measurements in one command: one ttr layer sequence-parallel on 1, 2, 4 GPUs (its communication
timed separately) and the FLUX.1-dev-shaped forward under diffusers' context parallelism, exact attention
(`native`) against ttr on the single blocks (`ttr-100`), each a torchrun job; one summary JSON with the targets.

    python -m attnplug.bench.multi_gpu --gpus 1,2,4 --size 4096 --out multi-gpu

writes `layer-<n>.json` (`bench/parallel.py`), `model-<n>.json` (`bench-model --context-parallel`) and
`summary.json`: per GPU count the layer's ms, its communication ms and its speedup over 1 GPU, the forwards' ms
and ttr's ratio to exact attention; the targets — the layer on 4 GPUs ≥ 3.5× its 1-GPU time, and the forward on 4
GPUs faster with ttr than with diffusers' context parallelism on exact attention. Every job runs with NVLink
multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1). `--smoke`: tiny shapes on gloo CPU
processes (the launcher's own test).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .context_parallel import MULTICAST_OFF

LAYER_TARGET = 3.5  # the layer on 4 GPUs: at least this many times faster than on 1
SMOKE_LAYER = ["--size", "128", "--text", "8", "--heads", "2", "--head-dim", "16", "--dtype", "fp32",
               "--warmup", "1", "--iters", "2"]
SMOKE_MODEL = ["--smoke", "--sizes", "64", "--txt", "8", "--reps", "1", "--warmup", "1", "--dtype", "fp32",
               "--device", "cpu"]


def torchrun(n: int, module: str, args: list[str], log: Path) -> int:
    """`python -m torch.distributed.run --standalone --nproc-per-node n -m module args`, NVLink multicast off,
    output to `log`; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", module, *args]
    env = {**os.environ, **MULTICAST_OFF, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def jobs(gpus: list[int], size: int, out: Path, smoke: bool, cp: str,
         attention_backend: str = "native") -> list[tuple[str, int, str, list[str]]]:
    """`(name, ranks, module, args)` of every job: the layer on each GPU count, then the forwards."""
    layer = SMOKE_LAYER if smoke else ["--size", str(size)]
    model = SMOKE_MODEL if smoke else ["--sizes", str(size)]
    out_jobs = []
    for n in gpus:
        out_jobs.append((f"layer-{n}", n, "attnplug.bench.parallel", [*layer, "--json", str(out / f"layer-{n}.json")]))
    for n in gpus:
        parallel = ["--context-parallel", cp, "--attention-backend", attention_backend] if n > 1 else []
        out_jobs.append((f"model-{n}", n, "attnplug.bench.model",
                         [*model, "--modes", "native,ttr-100", *parallel, "--json", str(out / f"model-{n}.json")]))
    return out_jobs


def summarize(out: Path, gpus: list[int]) -> dict[str, Any]:
    """The summary of the JSON files in `out` (a missing file: that row is None)."""
    def load(name: str) -> Any:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    layers = {n: load(f"layer-{n}.json") for n in gpus}
    base = (layers.get(1) or {}).get("layer_ms")
    layer_rows = {}
    for n, r in layers.items():
        if r is None:
            layer_rows[n] = None
            continue
        layer_rows[n] = {"layer_ms": r["layer_ms"], "comm_ms": r["comm_ms"], "path": r["path"],
                         "speedup_vs_1": (base / r["layer_ms"]) if base and r["layer_ms"] else None}
    model_rows = {}
    for n in gpus:
        report = load(f"model-{n}.json")
        if report is None:
            model_rows[n] = None
            continue
        ms = {r["mode"]: r["ms"] for r in report["results"]}
        native, ttr = ms.get("native"), ms.get("ttr-100")
        model_rows[n] = {"native_ms": native, "ttr_ms": ttr, "parallel": report.get("parallel"),
                         "ttr_vs_native": (native / ttr) if native and ttr else None}
    top = max(gpus)
    speedup = (layer_rows.get(4) or {}).get("speedup_vs_1")
    forward = (model_rows.get(top) or {}).get("ttr_vs_native")
    targets = {"layer_4_gpus_speedup": speedup, "layer_target": LAYER_TARGET,
               "layer_met": None if speedup is None else speedup >= LAYER_TARGET,
               f"forward_{top}_gpus_ttr_vs_native": forward,
               "forward_met": None if forward is None else forward > 1.0}
    return {"gpus": gpus, "layer": layer_rows, "model": model_rows, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4", help="comma list of GPU counts (default 1,2,4)")
    p.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    p.add_argument("--context-parallel", default="ulysses", choices=("ulysses", "ring"))
    p.add_argument("--attention-backend", default="native",
                   help="diffusers' attention backend of the context-parallel forwards (ring attention may need "
                        "one that supports it, e.g. _native_cudnn or flash)")
    p.add_argument("--out", type=Path, default=Path("multi-gpu"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on gloo CPU processes")
    a = p.parse_args(argv)
    gpus = sorted({int(g) for g in a.gpus.split(",") if g.strip()})
    a.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, n, module, args in jobs(gpus, a.size, a.out, a.smoke, a.context_parallel, a.attention_backend):
        print(f"attnplug multi-gpu: {name} on {n} rank(s)", file=sys.stderr, flush=True)
        if torchrun(n, module, args, a.out / f"{name}.log") != 0:
            failed.append(name)
            print(f"attnplug multi-gpu: {name} failed, see {a.out / (name + '.log')}", file=sys.stderr)
    summary = {**summarize(a.out, gpus), "failed": failed, "command": "python -m attnplug.bench.multi_gpu "
               + " ".join(argv if argv is not None else sys.argv[1:])}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["targets"]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
