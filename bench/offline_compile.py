"""Registers and stack (spill) bytes of the fused key and query passes, compiled for a GPU that is not here.

`python -m attnplug.bench.offline_compile --sizes 2048 --layers hybrid,joint [--config '{"joint_block_m": 128}' ...]`
builds the product's default layer (`bench.default_layer`) on the CPU, records the launches its serve plan makes
at the first call (nothing runs: the launcher is replaced by a recorder), compiles each for sm_90 with
the installed Triton and reads the cubin's resource usage with the `cuobjdump` bundled with Triton. One line per
launch: the pass, its tiles, registers per thread and stack bytes per thread (spills, once registers run
out at 255). A CPU-only check of what a kernel change does to register pressure; speed is measured on the GPU
(`attnplug.bench.tune`, `attnplug.bench.profile_kernels`). The Triton here may not be the one on the GPU machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..plugins.landmark.settings import LandmarkSettings
from ..plugins.ttr.kernels import KernelConfig, launchers
from ..plugins.ttr.kernels import serve_plan as serve_plan_module
from . import default_layer as default_layer_module

Launch = tuple[str, tuple[Any, ...], dict[str, Any]]  # a kernel's name, positional and compile-time arguments

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
           torch.int32: "i32", torch.int64: "i64"}


@contextlib.contextmanager
def recorded_launches(sms: int = 132) -> Iterator[list[Launch]]:
    """Within the block, fused launches are recorded into the yielded list instead of run, the plan sees `sms`
    multiprocessors and the CPU tensors pass the fused path's checks."""
    launches: list[Launch] = []

    class _Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            def launch(*args: Any, **consts: Any) -> None:
                launches.append((self.name, args, consts))
            return launch

    fake = types.SimpleNamespace(_query_kernel=_Recorder("_query_kernel"),
                                 _kv_state_kernel=_Recorder("_kv_state_kernel"),
                                 _landmark_softmax_kernel=_Recorder("_landmark_softmax_kernel"))
    saved = (launchers._kernels, serve_plan_module.num_sms, default_layer_module.fused_unsupported_reasons)
    launchers._kernels = lambda: fake  # type: ignore[assignment]
    serve_plan_module.num_sms = lambda device: sms  # type: ignore[assignment]
    default_layer_module.fused_unsupported_reasons = lambda *a, **k: []  # type: ignore[assignment]
    try:
        yield launches
    finally:
        launchers._kernels, serve_plan_module.num_sms, default_layer_module.fused_unsupported_reasons = saved


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"a kernel argument of type {type(value).__name__}")


def resources(launch: Launch, capability: int = 90) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the kernel compiled for `launch` on sm_`capability`."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ..plugins.ttr.kernels import tma_landmarks, triton_ttr

    name, args, consts = launch
    consts = dict(consts)
    if consts.get("FP8") == 2:  # a CPU plan's e4m3 for the interpreter: the GPU's tensor-core e4m3 instead
        consts["FP8"] = 1
    if name == "_landmark_softmax_kernel":  # a CPU plan never asks for warp specialisation; the GPU's would
        consts["WS"] = int(capability >= 90 and tma_landmarks._version(triton.__version__)
                           >= tma_landmarks.WARP_SPECIALIZE_SINCE)
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages"),
               **{k: consts.pop(k) for k in launchers.COMPILE_OPTIONS if k in consts}}
    fn = getattr(triton_ttr, name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1 is set): unset it to compile them")
    signature = {name: _arg_type(a) for name, a in zip(fn.arg_names, args)} | {name: "constexpr" for name in consts}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", capability, 128 if capability >= 90 else 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[:200]!r}")
    return int(regs.group(1)), int(stack.group(1))


def layer_launches(size: str, layer: str, config: KernelConfig, fp8: bool = False,
                   landmark_impl: str = "fused") -> list[Launch]:
    """The launches of the default layer's first call at `size` ('hybrid' or 'joint') with its landmark softmax
    through `landmark_impl` ('fused': in the landmark pass; 'tma': the TMA-fed kernel first) under `config`
    (`fp8`: the exact branch in e4m3, as on a GPU): its key pass, then the landmark kernel, then its query passes."""
    landmark = LandmarkSettings(precision="fp8") if fp8 else None
    inputs = default_layer_module.default_layer(size, torch.device("cpu"), landmark=landmark)
    with recorded_launches() as launches:
        call = inputs.joint(config, landmark_impl) if layer == "joint" else inputs.fused(config, landmark_impl)
        call()
    return launches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnplug.bench.offline_compile", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2048")
    p.add_argument("--layers", default="hybrid,joint", help="comma list of 'hybrid' and 'joint'")
    p.add_argument("--config", action="append", default=None,
                   help="JSON KernelConfig overrides, e.g. '{\"joint_block_m\": 128}' (repeatable; default: {})")
    p.add_argument("--capability", type=int, default=90, help="the GPU's compute capability ×10 (90: Hopper)")
    p.add_argument("--fp8", action="store_true", help="the exact branch in e4m3 ([plugins.landmark] precision = "
                                                      "'fp8')")
    p.add_argument("--landmark-impl", default="fused", choices=("fused", "tma"),
                   help="the landmark softmax in the landmark pass, or the TMA-fed kernel before it")
    a = p.parse_args(argv)
    layers = [x.strip() for x in a.layers.split(",") if x.strip()]
    if not layers or set(layers) - {"hybrid", "joint"}:
        p.error(f"--layers: expected 'hybrid' and/or 'joint', got {a.layers!r}")
    try:
        configs = [json.loads(c) for c in (a.config or ["{}"])]
        kernel_configs = [KernelConfig(**c) for c in configs]
    except (ValueError, TypeError) as exc:
        p.error(f"--config: expected JSON {{KernelConfig field: value}} ({exc})")
    for size in a.sizes.split(","):
        for overrides, cfg in zip(configs, kernel_configs):
            for layer in layers:
                for launch in layer_launches(size, layer, cfg, a.fp8, a.landmark_impl):
                    c = launch[2]
                    regs, stack = resources(launch, a.capability)
                    if launch[0] == "_kv_state_kernel":
                        what = (f"key pass BN={c['BN']} warps={c['num_warps']} HC={c['HC']} "
                                f"STORE_PK={c['STORE_PK']} STORE_LM={c['STORE_LM']}")
                    elif launch[0] == "_landmark_softmax_kernel":
                        what = f"landmark softmax BM={c['BM']} BL={c['BL']} warps={c['num_warps']}"
                    else:
                        what = (f"MODE={c['MODE']} BM={c['BM']} warps={c['num_warps']} WIN={c['WIN']} "
                                f"BLW={c['BLW']} HC={c['HC']} FP8={min(c['FP8'], 1)}")
                    print(f"{size} {layer} {json.dumps(overrides)} {what}: {regs} registers, {stack} B stack",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
