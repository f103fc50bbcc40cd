"""Tile sizes of the ttr kernels (`KernelConfig`), the rules that turn them into each launch's block shapes, and the
layout of what the launches read and write (the output's memory order, the landmarks loaded without a gather)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: The widest hidden / feature tile the kernels keep in registers.
MAX_REG_WIDTH = 256


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of each pass (docs/PERFORMANCE.md, "Per-pass tiles, relaxed atomics and host overhead";
    sweep: `python -m attnplug.bench.tune`).

    Key pass: `kv_*`. Query passes: the landmark pass (fixed-α hybrid, adaptive pass 1 or one pass) tiles with `lm_*`
    (rows and warps from `sdpa_lm_*` when cuDNN or the TMA-fed kernel, `tma_*`, gave the landmark softmax), the others (kernel-only,
    adaptive pass 2) with `q_*`; φ(q) is chunked by `lm_hidden_chunk` / `q_hidden_chunk`. A hidden chunk of 0,
    or one that is not a power of two ≥ 16 dividing the hidden width, computes a 2-layer φ's hidden tile at
    once. Defaults: sweeps of `bench.tune` on an H200 at 1024², 2048² and 4096² (docs/PERFORMANCE.md), each
    within a few % of the best at every size it applies to.
    """

    kv_block_n: int = 128  # key pass: keys per tile
    kv_warps: int = 8  # key pass: warps per program
    kv_stages: int = 3  # key pass: software-pipelining stages
    kv_programs_per_sm: int = 2  # key pass: split keys into chunks so that ~this many programs run per SM
    kv_hidden_chunk: int = 128  # key pass, 2-layer φ(k): hidden columns per step (0: all at once)
    q_block_m: int = 128  # kernel-only pass and adaptive pass 2: query rows per tile
    q_warps: int = 8  # kernel-only pass and adaptive pass 2: warps per program
    q_stages: int = 2  # kernel-only pass and adaptive pass 2: software-pipelining stages
    q_hidden_chunk: int = 0  # kernel-only pass and adaptive pass 2, 2-layer φ(q): hidden columns per step (0: all)
    # landmark pass (fixed-α hybrid, adaptive pass 1 or one pass): query rows per tile, warps, stages, landmark keys
    # per tile (in-kernel softmax) and window keys per tile (capped at the patch's key box). Small key tiles keep the
    # softmax's live [BM, BL] score tile short, which lets 4 warps hold the state: the whole default call on an H200
    # (2026-12-04) 1.356 vs 1.449 ms at 2048² and 0.383 vs 0.419 ms at 1024² for 128 rows on 8 warps with 128-key
    # landmark and 64-key window tiles
    lm_block_m: int = 64
    lm_hidden_chunk: int = 128  # landmark pass, 2-layer φ(q): hidden columns per step (fewer registers live
    # beside the landmark loops' state: 1572 vs 1677 µs at 2048² on an H200; pass 2 is faster whole)
    lm_warps: int = 4
    lm_stages: int = 3
    lm_block: int = 64
    lm_window_block: int = 32
    lm_patch_w: int = 16  # landmark pass with a window: image queries per tile as (lm_block_m / this) x this patches
    # in-kernel landmark softmax (landmark pass and joint pass): 0 gathers every landmark row through its index; 1
    # loads the leading landmarks that are key rows 0 … n−1 (the conditioning tokens, which every landmark selection
    # puts first) as they lie and gathers the rest; 2 as 1, the rest from contiguous rows (2 · B·H · (L − n) · D
    # values) that the key pass writes as it reads every key (a copy per call where the keys are not contiguous in D);
    # n is the caller's word or counted from indices on the CPU (`direct_rows`). The served call on an H200
    # (2026-12-04), 0 → 1: default layer 0.395 → 0.366 ms at 1024², 1.390 → 1.301 ms at 2048²; joint layer 1.777 →
    # 1.730 ms at 2048² (4096² takes cuDNN's landmarks: unchanged). 2, with a copy made by two index_selects per
    # call, read 1.242 / 1.659 ms at 2048² but 0.628 ms at 1024²; 2 as the key pass writes the rows: not timed yet
    lm_direct: int = 1
    # the landmark pass when cuDNN gave the landmark softmax (it only reads that and goes on over the window): rows
    # per tile, warps and window keys per tile — smaller tiles, two programs per SM (4096² on an H200: 6.98 vs 7.41
    # ms the call; 16-key window tiles 5.75 vs 5.84 ms for 32 and 5.89 for 64, 2026-12-04)
    sdpa_lm_block_m: int = 64
    sdpa_lm_warps: int = 4
    sdpa_lm_window_block: int = 16
    # the joint layer's pass (image rows; the window loop also takes the window keys' kernel terms out of the far
    # field): rows per tile, warps, landmark keys per tile (in-kernel softmax) and window keys per tile — its own,
    # apart from the landmark pass's (H200, 2048², the whole joint call with in-kernel landmarks: 64 rows on 4 warps
    # with 64-key landmark and 32-key window tiles 1.74 ms, the landmark pass's 128/64-key tiles on 8 warps 2.39 ms)
    joint_block_m: int = 64
    joint_warps: int = 4
    joint_lm_block: int = 64
    joint_window_block: int = 32
    # landmark_impl="tma": the landmark softmax as its own kernel (kernels/tma_landmarks.py) — query rows per tile,
    # landmarks per tile, warps asked (Triton ≥ 3.9 makes 4 into a producer and two consumer warp groups on sm_90:
    # 168 registers, no spills, offline) and pipelining stages; the landmark pass then takes the sdpa_lm_* tiles
    tma_block_m: int = 128
    tma_block: int = 64
    tma_warps: int = 4
    tma_stages: int = 2
    block_k: int = 64  # first in-kernel φ layer, every pass: input columns per step
    # landmark_impl="sdpa": out_l comes from cuDNN in one call over all heads, whose result is the output, where
    # all heads' landmark K/V copies fit within this fraction of the output's bytes (the memory target: SDPA's
    # peak + 10 %; the rest of the fused path adds ~3 %); else per head group and row chunk, the copies and one
    # chunk of out_l within it …
    sdpa_memory_fraction: float = 0.06
    sdpa_min_rows: int = 2048  # … with chunks of at least this many rows (small chunks under-fill the GPU)
    sdpa_whole: bool = True  # False: always per head group and row chunk (tests of that path)


DEFAULT_CONFIG = KernelConfig()
_active = [DEFAULT_CONFIG]


def active_config() -> KernelConfig:
    """The tiles a plan built without its own `config` takes: `DEFAULT_CONFIG`, or `using_config`'s inside it."""
    return _active[0]


def config_from_json(text: str, option: str = "--kernel-config") -> KernelConfig:
    """`DEFAULT_CONFIG` with the fields of the JSON object `text` replaced (`'{"lm_direct": 2}'`); a ValueError
    naming `option` and the field for anything else."""
    import dataclasses
    import json

    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}: not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{option}: expected a JSON object of KernelConfig fields, got {text!r}")
    known = {f.name: f.type for f in dataclasses.fields(KernelConfig)}
    for name, value in fields.items():
        if name not in known:
            raise ValueError(f"{option}: {name!r} is not a KernelConfig field (expected one of {', '.join(known)})")
        want = {"int": int, "float": (int, float), "bool": bool}[known[name]]
        if not isinstance(value, want) or (known[name] == "int" and isinstance(value, bool)):
            raise ValueError(f"{option}: {name} = {value!r}, expected {known[name]}")
    return dataclasses.replace(DEFAULT_CONFIG, **fields)


@contextlib.contextmanager
def using_config(config: KernelConfig | None) -> Iterator[None]:
    """Inside, every plan built without its own `config` takes `config` (None: the defaults) — a bench's run of
    another tile setting; plans built inside keep it after."""
    previous = _active[0]
    _active[0] = config or DEFAULT_CONFIG
    try:
        yield
    finally:
        _active[0] = previous


def leading_rows(idx: torch.Tensor) -> int:
    """How many of the landmark indices `idx` (`[L]`) are the key rows 0, 1, 2, … in order (the conditioning tokens
    that every landmark selection puts first). Reads `idx` on the host (a device sync for a GPU tensor)."""
    host = idx.detach().reshape(-1).to("cpu")
    differ = torch.nonzero(host != torch.arange(host.numel(), dtype=host.dtype))
    return int(differ[0]) if differ.numel() else int(host.numel())


def direct_rows(idx: torch.Tensor, promised: int | None) -> int:
    """How many leading landmarks of `idx` the landmark softmax loads without the gather: `promised` (the caller
    knows its selection puts key rows 0 … n−1 first; clamped to the landmarks), else `leading_rows` of CPU indices,
    else 0 — counting device indices would sync the device."""
    if promised is not None:
        return max(0, min(int(promised), int(idx.numel())))
    return leading_rows(idx) if idx.device.type == "cpu" else 0


def output_like(q: torch.Tensor, dv: int) -> torch.Tensor:
    """An empty `[B, H, Nq, dv]` output in q's dtype, laid out in memory as q is: heads inside tokens when the host
    handed `[B, N, H, D]` memory as a transposed view (diffusers, ComfyUI), so that the host's transpose back and
    flatten are views, not a copy of the output (SDPA's cuDNN and flash kernels lay their output out the same way)."""
    bsz, heads, nq = q.shape[:3]
    if heads > 1 and nq > 1 and q.stride(1) < q.stride(2):
        return torch.empty(bsz, nq, heads, dv, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(bsz, heads, nq, dv, device=q.device, dtype=q.dtype)


def pow2(n: int) -> bool:
    """A power of two of at least 16 (the widths `tl.arange` and `tl.dot` take)."""
    return n >= 16 and (n & (n - 1)) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the key pass splits its keys by them); 4 elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def block_k(want: int, din: int) -> int:
    """The widest chunk of the first layer's input (≤ want) that divides it."""
    for bk in (128, 64, 32, 16):
        if bk <= want and din % bk == 0:
            return bk
    return 16


def hidden_chunk(want: int, h1: int) -> int:
    """Hidden columns per step of a 2-layer φ: `want` when it is a power of two ≥ 16 dividing h1, else all."""
    return want if want and pow2(want) and want < h1 and h1 % want == 0 else h1


def query_hidden_chunk(cfg: KernelConfig, din: int, h1: int, landmark_pass: bool, mode: int) -> int:
    """Hidden columns per step of φ(q) in one query pass (`hidden_chunk` of the pass's field; `din`, `h1`: the
    in-kernel φ's input and hidden widths).

    Adaptive pass 2 (mode 3) with the whole hidden tile and an input narrower than 64 (one K step of the first
    layer: head_dim 32) is miscompiled by Triton 3.6 on Hopper — compute-sanitizer reports out-of-range shared
    addresses in the first layer's dot and the launch faults (kernel-only, the landmark pass and a chunked pass 2
    are clean) — so that pass is chunked there (by 128, the landmark pass's default chunk)."""
    hc = hidden_chunk(cfg.lm_hidden_chunk if landmark_pass else cfg.q_hidden_chunk, h1)
    if mode == 3 and din < 64 and hc == h1:
        return hidden_chunk(128, h1)
    return hc


def patch_width(want: int, grid_w: int, block_m: int) -> int:
    """Columns of a query patch with a window: `want` (a power of two, ≤ the tile's rows), at most the grid's
    width to the next power of two (a narrow grid gets taller patches, not half-empty ones)."""
    pw = 1 << (max(1, min(want, block_m)) - 1).bit_length()
    return max(1, min(pw, 1 << (max(1, grid_w) - 1).bit_length(), block_m))


def window_block(want: int, block_m: int, patch_w: int, window: int) -> int:
    """Window keys per tile: `want` (a power of two ≥ 16, else the next one), capped at the key box of one
    query patch (`(BM/PW + 2r)(PW + 2r)`, to the next power of two): no half-empty tiles on small windows."""
    box = (block_m // patch_w + 2 * window) * (patch_w + 2 * window)
    cap = max(16, 1 << (box - 1).bit_length())
    return min(max(16, 1 << (max(1, want) - 1).bit_length()), cap)
