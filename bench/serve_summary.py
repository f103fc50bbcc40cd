"""The short table `bench/serve_check.sh` prints last: the served call at a glance, from the JSON its steps wrote.

`python3 -m attnplug.bench.serve_summary OUT` reads `OUT/serve_bench.json` (`attnplug bench`: product path, bare
kernels, the finite guard, cuDNN), `OUT/serve_model*.json` (`attnplug bench-model`) and `OUT/host_*.json`
(`bench.host_overhead`), whichever exist, and prints one block each.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def layer_block(report: dict[str, Any]) -> list[str]:
    rows = {(r["shape"], r["variant"]): r for r in report["results"]}
    shapes = sorted({r["shape"] for r in report["results"]}, key=lambda s: [r["n_tokens"] for r in report["results"]
                                                                            if r["shape"] == s][0])
    names = ["sdpa[cudnn]", "session ttr-default", "session ttr-default every-call", "session ttr-default graph",
             "ttr-default fused", "ttr-default fused guarded", "ttr-default fused graph"]
    out = ["one layer (bf16, 24 x 128, 512 text tokens): ms (x fastest SDPA of its kind)",
           f"{'':>7} " + " ".join(f"{n.replace('ttr-default ', '').replace('session', 'sess.'):>18}" for n in names)]
    for shape in shapes:
        cells = []
        for name in names:
            r = rows.get((shape, name))
            ok = r is not None and r["ms"] is not None
            cells.append(f"{r['ms']:8.3f} ({r['speedup_vs_fastest_sdpa'] or 0:5.2f}x)" if ok else f"{'-':>18}")
        out.append(f"{shape:>7} " + " ".join(f"{c:>18}" for c in cells))
    return out


def model_block(report: dict[str, Any]) -> list[str]:
    out = []
    for r in report["results"]:
        if r["ms"] is None:
            out.append(f"{r['size']:>7} {r['mode']:<22} skipped: {(r['skipped'] or '')[:90]}")
            continue
        x = f"{r['x_native']:.3f}x {r.get('x_native_of') or 'native'}" if r.get("x_native") else "-"
        out.append(f"{r['size']:>7} {r['mode']:<22} {r['ms']:9.1f} ms  {x:<20} syncs/forward "
                   f"{r.get('syncs_per_forward')}, in Session.attention {r.get('syncs_in_attention')}; host "
                   f"{r.get('host_ms') or 0:.1f} ms; ttr calls {r['served_per_forward'].get('ttr', 0):g}")
    return out


def host_block(report: dict[str, Any]) -> list[str]:
    return [f"{r['label']:>10} {r['size']:>6} {r['finite_check']:<10} wall {r['wall_ms']:.3f} ms (x{r['x_sdpa']:.2f} "
            f"cuDNN)  device {r['device_us']:.0f} us  host {r['host_us']:.0f} us  overhead {r['overhead_us']:.0f} us"
            f"  syncs/call {r['syncs']}" for r in report["rows"]]


def summary(out: Path) -> str:
    lines: list[str] = []
    bench = _load(out / "serve_bench.json")
    if bench:
        lines += layer_block(bench) + [""]
    for path in sorted(out.glob("serve_model*.json")):
        report = _load(path)
        if report:
            lines += [f"whole FLUX.1-dev-shaped forward ({path.name}):"] + model_block(report) + [""]
    host = [r for path in sorted(out.glob("host_*.json")) if (r := _load(path))]
    if host:
        lines += ["host per served call (Session.attention, default layer):"]
        for report in host:
            lines += host_block(report)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(summary(Path(args[0] if args else "/tmp/out")))
    return 0


if __name__ == "__main__":  # python -m attnplug.bench.serve_summary OUT
    raise SystemExit(main())
