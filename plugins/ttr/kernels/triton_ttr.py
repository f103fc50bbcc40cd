"""Triton kernels of the ttr layer (inference only). Imported lazily: `import attnplug` never imports triton.

Two launches carry the layer, a third can go before the query pass:
- `_kv_state_kernel`: per (batch·head, key chunk), computes φ(k) in-kernel (up to two layers:
  the first K-looped from global memory, the second from registers), the activation, the L2
  norm and the key mask, and accumulates `S = Σ φ(k) vᵀ` and `z = Σ φ(k)` in fp32 over key
  tiles; each chunk adds its partial state into S and z with fp32 atomics (summation order, and so
  the last bits, may vary from run to run).
- `_query_kernel`: per (query tile, batch·head), computes φ(q), `out_k = φ(q)·S / (φ(q)·z + eps)`,
  the landmark branch (flash-style online softmax over the landmark keys, gathered by index, or an SDPA
  result that the host wrote into `out` beforehand — with a window, also its log-sum-exp, from which the
  online softmax goes on over the window) and the α blend in the epilogue. MODE selects kernel-only (0),
  fixed-α hybrid (1), adaptive pass 1 (2: writes out_l into `out`, d = 1 − cos(out_k, out_l), and adds
  each tile's sum of d into a per-(b, h) total) and adaptive pass 2 (3: recomputes the cheap kernel
  branch, reads out_l back from `out` and blends in place with the per-(b, h) mean of d) and adaptive in one
  pass (4: the mean of d is replaced by a reference known before the call — the layer's running mean of d,
  `alpha_reference = "running"` — so the landmark pass blends in its epilogue) and the joint layer's pass (5:
  image rows only; the exact set is the landmark set, which holds every text key, and the window; the far
  field's S and z come from a key pass masked to the far keys, each query's window keys' kernel terms are taken
  out of it inside the window loop, from the φ(k) the key pass wrote with STORE_PK = 1, and the epilogue applies
  the shared normaliser, `_shared_combine`). Modes 0–4 process every query row of the sequence. GUARD = 1 (the served call's non-finite check): the pass that writes the layer's output
  replaces every row that is not finite in the output's dtype by the landmark branch's row (kernel-only: zeros)
  and sets the int32 at `flag_ptr` (`_finite_rows`); GUARD = 0 compiles to the kernel without it.
  FP8 > 0 (`[plugins.landmark] precision = "fp8"`) computes the exact softmax's two products in e4m3
  (`_softmax_step`, core/exact_fp8.py), the values' per-channel scales from the key pass's max |v| (VMAX = 1).
  WIN = r > 0 (the landmark plugin's local window) continues the landmark softmax over each image
  query's window of image keys (Chebyshev radius r on the latent grid, minus the landmarks, flagged per
  key in `lmf_ptr`); the landmark pass then tiles the conditioning rows first and the image queries as
  `BM/PW x PW` patches of the grid (`_patch_rows`), whose windows share one box of keys
  (`_window_softmax`). WIN = 0 compiles to the landmark-only kernel.
  (Computing out_l before out_k was tried: ptxas spilled more — out_l then lives across φ(q), while
  out_k is only saved and reloaded around the landmark loop.)
- `_landmark_softmax_kernel` (`landmark_impl = "tma"`): the landmark softmax alone, per (query tile, batch·head),
  over the landmark rows the key pass wrote contiguous, through tensor descriptors, warp-specialised where the
  compiler can; it writes out_l into `out` and the log-sum-exp, which the landmark pass reads as it reads cuDNN's.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu(x, FAST: tl.constexpr):
    """x·sigmoid(x), φ's hidden activation. FAST (bf16/fp16 on a GPU): sigmoid as 0.5 + 0.5·tanh(x/2) with the
    hardware tanh — one special-function op per element instead of exp and reciprocal (those ops are the
    φ passes' busiest pipe after the tensor cores); its relative error (~2^-11) is below the 16-bit rounding
    the result gets before the next layer's dot. The interpreter has no inline PTX: FAST is off there."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return x * (0.5 + 0.5 * t)
    return x * tl.sigmoid(x)


@triton.jit
def _phi_tile(x_base, offs_n, row_ok, stride_xn, w1_ptr, b1_ptr, w2_ptr, b2_ptr, norm_eps,
              DIN: tl.constexpr, BK: tl.constexpr, H1: tl.constexpr, F1: tl.constexpr, DEPTH: tl.constexpr,
              ACT: tl.constexpr, IS_HH: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
              NORM: tl.constexpr, HC: tl.constexpr, FAST_SILU: tl.constexpr):
    """φ of a tile of rows: returns (f_pos, f_neg) fp32 `[BN, F1]` (f_neg only meaningful for hedgehog).

    Two layers with HC < H1: the hidden layer is computed HC columns at a time and each chunk is folded
    into the second layer's accumulator at once, so no `[BN, H1]` hidden tile (nor all of W2) is held in
    registers; the input tile is re-read per chunk (from cache)."""
    offs_f = tl.arange(0, F1)
    if DEPTH == 2 and HC < H1:
        a = tl.zeros((offs_n.shape[0], F1), dtype=tl.float32)
        for hc in range(0, H1, HC):
            offs_c = hc + tl.arange(0, HC)
            acc = tl.zeros((offs_n.shape[0], HC), dtype=tl.float32)
            for kk in range(0, DIN, BK):
                offs_k = kk + tl.arange(0, BK)
                x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_k[None, :], mask=row_ok[:, None],
                            other=0.0)
                w = tl.load(w1_ptr + offs_k[:, None] * H1 + offs_c[None, :])
                acc = tl.dot(x, w.to(x.dtype), acc)
            if HAS_B1:
                acc += tl.load(b1_ptr + offs_c)[None, :].to(tl.float32)
            hid = _silu(acc, FAST_SILU)
            w2 = tl.load(w2_ptr + offs_c[:, None] * F1 + offs_f[None, :])
            a = tl.dot(hid.to(w2.dtype), w2, a)
        if HAS_B2:
            a += tl.load(b2_ptr + offs_f)[None, :].to(tl.float32)
    elif DEPTH == 0:
        # pre-activations were computed outside (cuBLAS prefix): read them.
        a = tl.load(x_base + offs_n[:, None] * stride_xn + offs_f[None, :], mask=row_ok[:, None], other=0.0)
        a = a.to(tl.float32)
    else:
        OUT1: tl.constexpr = H1 if DEPTH == 2 else F1
        offs_o = tl.arange(0, OUT1)
        acc = tl.zeros((offs_n.shape[0], OUT1), dtype=tl.float32)
        for kk in range(0, DIN, BK):
            offs_k = kk + tl.arange(0, BK)
            x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            w = tl.load(w1_ptr + offs_k[:, None] * OUT1 + offs_o[None, :])
            acc = tl.dot(x, w.to(x.dtype), acc)
        if HAS_B1:
            acc += tl.load(b1_ptr + offs_o)[None, :].to(tl.float32)
        if DEPTH == 2:
            hid = _silu(acc, FAST_SILU)
            offs_h = tl.arange(0, H1)
            w2 = tl.load(w2_ptr + offs_h[:, None] * F1 + offs_f[None, :])
            a = tl.dot(hid.to(w2.dtype), w2)
            if HAS_B2:
                a += tl.load(b2_ptr + offs_f)[None, :].to(tl.float32)
        else:
            a = acc
    if IS_HH:
        ep = tl.exp(a - tl.max(a, axis=1)[:, None])
        f_pos = ep / tl.sum(ep, axis=1)[:, None]
        en = tl.exp(-a - tl.max(-a, axis=1)[:, None])
        f_neg = en / tl.sum(en, axis=1)[:, None]
        if NORM:
            ss = tl.sum(f_pos * f_pos, axis=1) + tl.sum(f_neg * f_neg, axis=1)
            inv = 1.0 / tl.maximum(tl.sqrt(ss), norm_eps)
            f_pos = f_pos * inv[:, None]
            f_neg = f_neg * inv[:, None]
    else:
        if ACT == 0:
            f_pos = tl.where(a > 0, a + 1.0, tl.exp(tl.minimum(a, 0.0)))
        else:
            f_pos = tl.maximum(a, 0.0)
        if NORM:
            ss = tl.sum(f_pos * f_pos, axis=1)
            f_pos = f_pos * (1.0 / tl.maximum(tl.sqrt(ss), norm_eps))[:, None]
        f_neg = f_pos
    return f_pos, f_neg


@triton.jit
def _kv_state_kernel(x_ptr, v_ptr, m_ptr, s_ptr, z_ptr, pk_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     k_ptr, slot_ptr, kc_ptr, vc_ptr, vm_ptr,
                     N, H, CHUNK, L_ROWS,
                     sxb, sxh, sxn, svb, svh, svn, smb, spk, skb, skh, skn,
                     w1h, b1h, w2h, b2h, norm_eps,
                     D: tl.constexpr, DIN: tl.constexpr, BK: tl.constexpr, H1: tl.constexpr, F1: tl.constexpr,
                     DEPTH: tl.constexpr, ACT: tl.constexpr, IS_HH: tl.constexpr, HAS_B1: tl.constexpr,
                     HAS_B2: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, BN: tl.constexpr,
                     HC: tl.constexpr, FAST_SILU: tl.constexpr, STORE_PK: tl.constexpr, STORE_LM: tl.constexpr,
                     VMAX: tl.constexpr):
    """S and z of a chunk of keys (atomically added); with STORE_PK also φ of each key, with STORE_LM the K and V
    rows of the keys whose `slot` (int32 per key, −1: none) is ≥ 0 into row `slot` of `[B·H, L_ROWS, D]` buffers
    (the landmarks the query pass reads as contiguous rows, `KernelConfig.lm_direct` = 2); with VMAX each channel's
    max |v| over every key into `vm_ptr` (`[B·H, D]` fp32, zeroed: the exact branch's FP8 value scales)."""
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    x_base = x_ptr + b * sxb + h * sxh
    v_base = v_ptr + b * svb + h * svh
    w1 = w1_ptr + h * w1h
    b1 = b1_ptr + h * b1h
    w2 = w2_ptr + h * w2h
    b2 = b2_ptr + h * b2h
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, F1)
    if STORE_LM:  # a loop of its own, before the state's accumulators are live: no registers taken from them
        for n0 in range(start, end, BN):
            offs_n = n0 + tl.arange(0, BN)
            slot = tl.load(slot_ptr + offs_n, mask=offs_n < end, other=-1)
            lm = (slot >= 0)[:, None]
            rows = pid_bh * L_ROWS * D + slot[:, None] * D + offs_d[None, :]
            kt = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=lm, other=0.0)
            tl.store(kc_ptr + rows, kt, mask=lm)
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=lm, other=0.0)
            tl.store(vc_ptr + rows, vt, mask=lm)
    s1 = tl.zeros((F1, D), dtype=tl.float32)
    z1 = tl.zeros((F1,), dtype=tl.float32)
    s2 = tl.zeros((F1, D), dtype=tl.float32)
    z2 = tl.zeros((F1,), dtype=tl.float32)
    PKW: tl.constexpr = 2 * F1 if IS_HH else F1
    vmx = tl.zeros((D,), dtype=tl.float32)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        ok = offs_n < end
        f1, f2 = _phi_tile(x_base, offs_n, ok, sxn, w1, b1, w2, b2, norm_eps, DIN, BK, H1, F1, DEPTH, ACT, IS_HH,
                           HAS_B1, HAS_B2, NORM, HC, FAST_SILU)
        if STORE_PK:
            # φ of every key, in the buffer's dtype (the joint pass takes its window keys' terms out of S and z)
            pk_rows = pk_ptr + pid_bh * spk + offs_n[:, None] * PKW + offs_f[None, :]
            tl.store(pk_rows, f1.to(pk_ptr.dtype.element_ty), mask=ok[:, None])
            if IS_HH:
                tl.store(pk_rows + F1, f2.to(pk_ptr.dtype.element_ty), mask=ok[:, None])
        keep = ok
        if HAS_MASK:
            mk = tl.load(m_ptr + b * smb + offs_n, mask=ok, other=0)
            keep = keep & (mk != 0)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=ok[:, None], other=0.0)
        if VMAX:
            vmx = tl.maximum(vmx, tl.max(tl.abs(vt.to(tl.float32)), axis=0))
        f1 = tl.where(keep[:, None], f1, 0.0)
        s1 = tl.dot(tl.trans(f1.to(vt.dtype)), vt, s1)
        z1 += tl.sum(f1, axis=0)
        if IS_HH:
            f2 = tl.where(keep[:, None], f2, 0.0)
            s2 = tl.dot(tl.trans(f2.to(vt.dtype)), vt, s2)
            z2 += tl.sum(f2, axis=0)
    # relaxed: only the sum matters, read after the kernel ends (the default acq_rel orders every add)
    FT: tl.constexpr = 2 * F1 if IS_HH else F1
    s_base = s_ptr + pid_bh * (FT * D)
    z_base = z_ptr + pid_bh * FT
    tl.atomic_add(s_base + offs_f[:, None] * D + offs_d[None, :], s1, sem="relaxed")
    tl.atomic_add(z_base + offs_f, z1, sem="relaxed")
    if IS_HH:
        tl.atomic_add(s_base + F1 * D + offs_f[:, None] * D + offs_d[None, :], s2, sem="relaxed")
        tl.atomic_add(z_base + F1 + offs_f, z2, sem="relaxed")
    if VMAX:
        tl.atomic_max(vm_ptr + pid_bh * D + offs_d, vmx, sem="relaxed")


@triton.jit
def _state_numerator(f1, f2, s_base, offs_f, offs_d, D: tl.constexpr, F1: tl.constexpr, IS_HH: tl.constexpr):
    """φ(q)ᵀS `[BM, D]` fp32 for a tile's features `f1` (`f2`: hedgehog's second half) in the output's dtype. S
    comes scaled by s_scale and in the output's dtype (`ServePlan.scaled_state`: once per call, not per tile)."""
    st = tl.load(s_base + offs_f[:, None] * D + offs_d[None, :])
    num = tl.dot(f1, st)
    if IS_HH:
        st2 = tl.load(s_base + F1 * D + offs_f[:, None] * D + offs_d[None, :])
        num = tl.dot(f2, st2, num)
    return num


@triton.jit
def _e4m3(x, FP8: tl.constexpr):
    """`x` (fp32) rounded to e4m3, saturated at ±448: fp8 for the tensor cores (FP8 = 1), or the rounded values in
    fp32 computed arithmetically (FP8 = 2, the interpreter: its e4m3 cast truncates subnormals and its e4m3 dot
    flattens its operands) — 3 mantissa bits, subnormal steps of 2^-9, ties rounded up."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if FP8 == 2:
        e = tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30)))
        step = tl.exp2(tl.maximum(e, -6.0) - 3.0)
        x8 = tl.floor(x / step + 0.5) * step
    else:
        x8 = x.to(tl.float8e4nv)
    return x8


@triton.jit
def _e4m3_rows(x, FP8: tl.constexpr):
    """`(x8, scale)`: the rows of `x` rounded to e4m3 with one scale per row (max |x| / 448), core/exact_fp8.py."""
    xf = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-12) * (1.0 / 448.0)
    return _e4m3(xf / scale[:, None], FP8), scale


@triton.jit
def _exact_inputs(q, vm_base, offs_d, FP8: tl.constexpr):
    """What the exact softmax's steps read: the query tile (rounded to e4m3 with FP8), its per-row scale and the
    values' per-channel scale from the key pass's max |v| (both 1.0 without FP8)."""
    if FP8:
        q8, sq = _e4m3_rows(q, FP8)
        vs = tl.maximum(tl.load(vm_base + offs_d), 1e-12) * (1.0 / 448.0)
    else:
        q8, sq, vs = q, 1.0, 1.0
    return q8, sq, vs


@triton.jit
def _softmax_step(q, kt, vt, keep, m_i, l_i, acc, qk_scale, sq, vs, FP8: tl.constexpr):
    """One tile of a flash-style online softmax: fold keys `kt` / values `vt` (`[BK, D]`, where `keep`, a mask
    broadcastable to `[BM, BK]`) into the running max `m_i`, sum `l_i` and output `acc` of the query tile `q`
    (max in the exp2 domain: scores times `qk_scale`, folded into the exponent's FMA). A row that has seen no
    key yet keeps max −inf; 0 is used in its place (no NaN from −inf − −inf).

    FP8 (`[plugins.landmark] precision = "fp8"`, core/exact_fp8.py): `q` comes rounded to e4m3 with per-row scales
    `sq` (`_exact_inputs`); the keys are rounded per row here, the scores scaled back; P·V takes P·448 and the
    values at their per-channel scales `vs` in e4m3, its product added to the rescaled accumulator in fp32."""
    if FP8:
        k8, sk = _e4m3_rows(kt, FP8)
        sc = tl.dot(q, tl.trans(k8)) * (sq[:, None] * sk[None, :])
    else:
        sc = tl.dot(q, tl.trans(kt))
    sc = tl.where(keep, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(sc * qk_scale - m_use[:, None])
    corr = tl.exp2(m_i - m_use)
    l_i = l_i * corr + tl.sum(p, axis=1)
    if FP8:
        v8 = _e4m3(vt.to(tl.float32) / vs[None, :], FP8)
        pv = tl.dot(_e4m3(p * 448.0, FP8), v8)
        acc = acc * corr[:, None] + pv * (vs * (1.0 / 448.0))[None, :]
    else:
        acc = tl.dot(p.to(vt.dtype), vt, acc * corr[:, None])
    return m_new, l_i, acc


@triton.jit
def _patch_rows(pid_m, n_text_tiles, n_cond, grid_h, grid_w, BM: tl.constexpr, PW: tl.constexpr):
    """Rows of landmark-pass tile `pid_m` when a window runs: the first `n_text_tiles` tiles hold the conditioning
    rows (BM at a time), every later one a `BM/PW x PW` patch of the latent grid (row-major patches). Returns
    `(rows, row_ok, patch row, patch column)`; the patch indices are −1 for a conditioning tile."""
    PH: tl.constexpr = BM // PW
    i = tl.arange(0, BM)
    is_txt = pid_m < n_text_tiles
    pid_p = tl.maximum(pid_m - n_text_tiles, 0)
    n_pc = (grid_w + PW - 1) // PW
    pr = pid_p // n_pc
    pc = pid_p % n_pc
    gr = pr * PH + i // PW
    gc = pc * PW + i % PW
    txt_rows = pid_m * BM + i
    rows = tl.where(is_txt, txt_rows, n_cond + gr * grid_w + gc)
    row_ok = tl.where(is_txt, txt_rows < n_cond, (gr < grid_h) & (gc < grid_w))
    return rows, row_ok, tl.where(is_txt, -1, pr), tl.where(is_txt, -1, pc)


@triton.jit
def _window_softmax(q, kl_base, vl_base, lmf_ptr, offs_d, m_i, l_i, acc, pr, pc, n_cond, grid_h, grid_w, qk_scale,
                    skn, svn, fq1, fq2, pk_base, num_u, den_u, sq, vs, WIN: tl.constexpr, BLW: tl.constexpr,
                    PH: tl.constexpr, PW: tl.constexpr, FAR: tl.constexpr, F1: tl.constexpr, IS_HH: tl.constexpr,
                    FP8: tl.constexpr):
    """Continue the online softmax `(m_i, l_i, acc)` of a query patch over its local windows.

    Image tokens sit row-major on the `grid_h x grid_w` latent grid after `n_cond` conditioning tokens; the
    tile is the `PH x PW` patch (`pr`, `pc`) of that grid (`_patch_rows`; −1: a conditioning tile, no window).
    Its windows together cover the box of `(PH + 2r) x (PW + 2r)` grid cells whose corner is `(pr·PH − r,
    pc·PW − r)` (240 keys for a 8 x 16 patch at r = 2), visited BLW at a time in row-major order; cells off the
    grid count as missing keys. Every box has the same shape, so a key's place in it and a query's in the patch
    are compile-time divisions, and "within the window" is two range checks per (query, key): |box row −
    (patch row + r)| ≤ r, and the same for columns (fp32: the compare takes |·| for free). A key counts when it
    is on the grid and not a landmark (`lmf_ptr`, int8 per key: the landmark loop counted it). Rows of the
    patch off the grid are never stored, so their masks need no check.
    (Offline sm_90 compile: a box clipped to the grid, of runtime width, cost ~1440 instructions per 64-key
    step — divisions by that width and integer checks per pair; this one ~1000.)

    FAR (the joint layer's pass): the same window keys are also far keys of the learned field, so their kernel
    terms come out of its unscaled numerator `num_u [BM, D]` and denominator `den_u [BM]`: with the queries'
    features `fq1` (`fq2`: hedgehog's second half) and the keys' φ read from `pk_base` (rows of `2·F1` or `F1`
    values, written by the key pass), `kern = φ(q)·φ(k)ᵀ` on the window members, `num_u −= kern·v`,
    `den_u −= Σ kern` — the value tile is the one the softmax step loads. FAR = 0 returns both unchanged.
    """
    BW: tl.constexpr = PW + 2 * WIN
    NBOX: tl.constexpr = (PH + 2 * WIN) * BW
    PKW: tl.constexpr = 2 * F1 if IS_HH else F1
    i = tl.arange(0, PH * PW)
    q_r = (i // PW + WIN).to(tl.float32)  # the box row of the query's window centre
    q_c = (i % PW + WIN).to(tl.float32)
    offs_f = tl.arange(0, F1)
    r0 = pr * PH - WIN
    c0 = pc * PW - WIN
    for f0 in range(0, tl.where(pr >= 0, NBOX, 0), BLW):
        f = f0 + tl.arange(0, BLW)
        k_r = f // BW
        k_c = f % BW
        g_r = r0 + k_r
        g_c = c0 + k_c
        k_ok = (f < NBOX) & (g_r >= 0) & (g_r < grid_h) & (g_c >= 0) & (g_c < grid_w)
        tok = n_cond + g_r * grid_w + g_c
        k_ok = k_ok & (tl.load(lmf_ptr + tok, mask=k_ok, other=1) == 0)  # landmarks: counted already
        kt = tl.load(kl_base + tok[:, None] * skn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        vt = tl.load(vl_base + tok[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        k_rf = tl.where(k_ok, k_r.to(tl.float32), 1e4)  # a missing key is out of every window
        near = ((tl.abs(k_rf[None, :] - q_r[:, None]) <= WIN)
                & (tl.abs(k_c.to(tl.float32)[None, :] - q_c[:, None]) <= WIN))
        m_i, l_i, acc = _softmax_step(q, kt, vt, near, m_i, l_i, acc, qk_scale, sq, vs, FP8)
        if FAR:
            pk_rows = pk_base + tok[:, None] * PKW + offs_f[None, :]
            pk1 = tl.load(pk_rows, mask=k_ok[:, None], other=0.0)
            kern = tl.dot(fq1, tl.trans(pk1))
            if IS_HH:
                pk2 = tl.load(pk_rows + F1, mask=k_ok[:, None], other=0.0)
                kern = tl.dot(fq2, tl.trans(pk2), kern)
            kern = tl.where(near, kern, 0.0)
            num_u = tl.dot((-kern).to(vt.dtype), vt, num_u)
            den_u = den_u - tl.sum(kern, axis=1)
    return m_i, l_i, acc, num_u, den_u


@triton.jit
def _disagreement(ok, ol):
    """d = 1 − cos(out_k, out_l) per row (as plugins/ttr/layer.py)."""
    dot = tl.sum(ok * ol, axis=1)
    nrm = tl.sqrt(tl.sum(ok * ok, axis=1)) * tl.sqrt(tl.sum(ol * ol, axis=1))
    return 1.0 - dot / tl.maximum(nrm, 1e-8)


@triton.jit
def _adaptive_blend(ok, ol, dd, mean, logit, gamma, alpha_max):
    """out_k + α·(out_l − out_k), α = α_max·σ(logit + γ·(min(d / mean, 3) / 3 − 0.5)), the argument clamped to ±15."""
    dn = tl.minimum(dd / tl.maximum(mean, 1e-12), 3.0) / 3.0
    arg = tl.minimum(tl.maximum(logit + gamma * (dn - 0.5), -15.0), 15.0)
    a = alpha_max / (1.0 + tl.exp(-arg))
    return ok + a[:, None] * (ol - ok)


@triton.jit
def _shared_combine(o_e, m_i, l_i, num_u, den_u, q_base, offs_m, offs_d, row_ok, sqn, bq_ptr, a_h, aff_ptr, eps,
                    HAS_AFF: tl.constexpr):
    """The joint layer's shared normaliser (plugins/ttr/joint.py): `O_E + w·(O_far − O_E)`, `w = σ(log φ(q)ᵀz_far +
    a_h + b_hᵀq (+ the conditioner's shift) − LSE_E)`, with the exact set's softmax state `(o_e, m_i, l_i)` (exp2
    domain; LSE_E = −1e4 for a row with no key) and the far field's unscaled numerator and denominator (clamped
    at 0; the conditioner scales and shifts O_far)."""
    den = tl.maximum(den_u, 0.0)
    o_far = num_u / (den + eps)[:, None]
    shift = 0.0
    if HAS_AFF:
        o_far = o_far * (1.0 + tl.load(aff_ptr + 0)) + tl.load(aff_ptr + 1)
        shift = tl.load(aff_ptr + 2)
    qf = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    g = tl.sum(qf * tl.load(bq_ptr + offs_d)[None, :], axis=1)
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, -1e4)
    arg = tl.log(tl.maximum(den, 1e-30)) + a_h + g + shift - lse
    w = 1.0 / (1.0 + tl.exp(-arg))
    return o_e + w[:, None] * (o_far - o_e)


@triton.jit
def _finite_rows(res, fallback, row_ok, flag_ptr, out_dtype: tl.constexpr):
    """`res` (fp32 `[BM, D]`) with every row that is not finite once cast to `out_dtype` (NaN, ±inf, an fp16
    overflow) replaced by `fallback`'s row (zeros where that is not finite either); where a valid row was replaced,
    the int32 at `flag_ptr` is set to 1 (every writer writes 1: no atomic needed). Returns fp32 values that are
    finite in `out_dtype`. |x| < inf and |x| <= max are false for NaN and ±inf alike.

    fp16 checks every value after the cast (its range is narrow: a large finite row may overflow one value). bf16
    and fp32 share fp32's range, so a row is checked by its sum of |x| alone — NaN and ±inf carry into the sum, and a
    finite sum within the range bounds every value — one reduction and no cast round trip (a row whose finite values
    sum beyond ~3e38 counts as not finite too)."""
    if out_dtype == tl.float16:
        cast = res.to(out_dtype).to(tl.float32)
        bad = tl.sum(tl.where(tl.abs(cast) < float("inf"), 0, 1), axis=1) > 0
        fb = fallback.to(out_dtype).to(tl.float32)
        fb = tl.where(tl.abs(fb) < float("inf"), fb, 0.0)
    else:
        cast = res
        bad = ~(tl.sum(tl.abs(res), axis=1) <= 3.0e38)
        fb = tl.where(tl.abs(fallback) <= 3.0e38, fallback, 0.0)
    n_bad = tl.sum((bad & row_ok).to(tl.int32), axis=0)
    tl.store(flag_ptr, 1, mask=n_bad > 0)
    return tl.where(bad[:, None], fb, cast)


@triton.jit
def _query_kernel(q_ptr, x_ptr, s_ptr, z_ptr, kl_ptr, vl_ptr, idx_ptr, lmf_ptr, out_ptr, d_ptr, dsum_ptr, lse_ptr,
                  logit_ptr, aff_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, flag_ptr, pk_ptr, bq_ptr, kc_ptr, vc_ptr, vm_ptr,
                  N, L, H, n_cond, n_text_tiles, grid_h, grid_w, L_DIRECT, s_scale, eps, alpha_max, gamma, qk_scale,
                  norm_eps,
                  sqb, sqh, sqn, sxb, sxh, sxn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                  w1h, b1h, w2h, b2h, logit_h, spk,
                  D: tl.constexpr, DIN: tl.constexpr, BK: tl.constexpr, H1: tl.constexpr, F1: tl.constexpr,
                  DEPTH: tl.constexpr, ACT: tl.constexpr, IS_HH: tl.constexpr, HAS_B1: tl.constexpr,
                  HAS_B2: tl.constexpr, NORM: tl.constexpr, MODE: tl.constexpr, LM_SRC: tl.constexpr,
                  HAS_AFF: tl.constexpr, BM: tl.constexpr, BL: tl.constexpr, HC: tl.constexpr,
                  WIN: tl.constexpr, BLW: tl.constexpr, PW: tl.constexpr, FAST_SILU: tl.constexpr,
                  GUARD: tl.constexpr, LM_DIRECT: tl.constexpr, FP8: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if WIN > 0:
        # the landmark pass with a window tiles image queries as 2-D patches of the grid (_patch_rows)
        offs_m, row_ok, pr, pc = _patch_rows(pid_m, n_text_tiles, n_cond, grid_h, grid_w, BM, PW)
    elif MODE == 5:
        # the joint pass covers the image rows only (SDPA gives the text rows)
        offs_m = n_cond + pid_m * BM + tl.arange(0, BM)
        row_ok = offs_m < N
    else:
        offs_m = pid_m * BM + tl.arange(0, BM)
        row_ok = offs_m < N
    offs_d = tl.arange(0, D)
    o_ptrs = out_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :]
    t_ptrs = offs_m + pid_bh * N  # d is contiguous [B, H, N]
    out_dtype = out_ptr.dtype.element_ty
    # ---- kernel branch (every mode: pass 2 recomputes it, it is the cheap branch) --------------
    if True:
        x_base = x_ptr + b * sxb + h * sxh
        f1, f2 = _phi_tile(x_base, offs_m, row_ok, sxn, w1_ptr + h * w1h, b1_ptr + h * b1h, w2_ptr + h * w2h,
                           b2_ptr + h * b2h, norm_eps, DIN, BK, H1, F1, DEPTH, ACT, IS_HH, HAS_B1, HAS_B2, NORM, HC,
                           FAST_SILU)
        FT: tl.constexpr = 2 * F1 if IS_HH else F1
        offs_f = tl.arange(0, F1)
        s_base = s_ptr + pid_bh * (FT * D)
        z_base = z_ptr + pid_bh * FT
        zt = tl.load(z_base + offs_f) * s_scale
        den = tl.sum(f1 * zt[None, :], axis=1)
        if IS_HH:
            zt2 = tl.load(z_base + F1 + offs_f) * s_scale
            den += tl.sum(f2 * zt2[None, :], axis=1)
        if MODE == 5:
            # the far field, unscaled: the window keys' terms come out of it in the landmark pass below. Its
            # numerator φ(q)ᵀS joins in the epilogue, so that no [BM, D] accumulator besides the softmax's is live
            # over the landmark loop (the window loop starts from zeros)
            num_u = tl.zeros((BM, D), dtype=tl.float32)
            den_u = den / s_scale
            fq1 = f1.to(out_dtype)
            fq2 = f2.to(out_dtype)
            pk_base = pk_ptr + pid_bh * spk
        else:
            ok = _state_numerator(f1.to(out_dtype), f2.to(out_dtype), s_base, offs_f, offs_d, D, F1, IS_HH)
            ok = ok / (den + eps * s_scale)[:, None]
            if HAS_AFF:
                ok = ok * (1.0 + tl.load(aff_ptr + b * 4 + 0)) + tl.load(aff_ptr + b * 4 + 1)
            num_u = 0.0  # (read by the joint pass only)
            den_u = 0.0
            fq1 = f1
            fq2 = f2
            pk_base = pk_ptr
    # ---- landmark branch -------------------------------------------------------------------
    if MODE == 3:
        # pass 2: pass 1 left out_l (after its affine) in `out`
        ol = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    elif MODE != 0:
        kl_base = kl_ptr + b * skb + h * skh
        vl_base = vl_ptr + b * svb + h * svh
        if LM_SRC == 1:
            # the SDPA landmark softmax was written into `out` before this launch (before its affine)
            ol = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            if WIN > 0 or MODE == 5:
                # … and its log-sum-exp (natural log, scale 1/√D) into `lse`: (normalised output, max = lse, sum =
                # 1) is the online softmax's state after the landmarks, which goes on over the windows
                m_i = tl.load(lse_ptr + t_ptrs, mask=row_ok, other=0.0) * 1.4426950408889634  # to the exp2 domain
                l_i = tl.full((BM,), 1.0, dtype=tl.float32)
                if WIN > 0:
                    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                                mask=row_ok[:, None], other=0.0)
                    q, sq, vs = _exact_inputs(q, vm_ptr + pid_bh * D, offs_d, FP8)
                    m_i, l_i, ol, num_u, den_u = _window_softmax(
                        q, kl_base, vl_base, lmf_ptr, offs_d, m_i, l_i, ol, pr, pc, n_cond, grid_h, grid_w, qk_scale,
                        skn, svn, fq1, fq2, pk_base, num_u, den_u, sq, vs, WIN, BLW, BM // PW, PW, MODE == 5, F1,
                        IS_HH, FP8)
                    ol = ol / l_i[:, None]
        else:
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            q, sq, vs = _exact_inputs(q, vm_ptr + pid_bh * D, offs_d, FP8)
            m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BM,), dtype=tl.float32)
            acc = tl.zeros((BM, D), dtype=tl.float32)
            # every tile masked: running whole tiles unmasked and the partial one apart cut ~120 instructions
            # per tile (offline sm_90) but doubled the spills inside the loop, and was slower on the H200 (2048²,
            # no window: 1429 vs 1272 µs device time, docs/PERFORMANCE.md)
            if LM_DIRECT > 0:
                # the first L_DIRECT landmarks are key rows 0 … L_DIRECT−1 (the conditioning tokens): loaded as they
                # lie, no index gather
                for l0 in range(0, L_DIRECT, BL):
                    offs_l = l0 + tl.arange(0, BL)
                    l_ok = offs_l < L_DIRECT
                    kt = tl.load(kl_base + offs_l[:, None] * skn + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                    vt = tl.load(vl_base + offs_l[:, None] * svn + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                    m_i, l_i, acc = _softmax_step(q, kt, vt, l_ok[None, :], m_i, l_i, acc, qk_scale, sq, vs, FP8)
                l_rest = L_DIRECT
            else:
                l_rest = 0  # a compile-time start: the loop compiles as it did before the direct loads
            for l0 in range(l_rest, L, BL):
                offs_l = l0 + tl.arange(0, BL)
                l_ok = offs_l < L
                if LM_DIRECT == 2:
                    # the other landmarks from this call's contiguous copy `[B·H, L − L_DIRECT, D]`
                    r = offs_l - L_DIRECT
                    c_base = pid_bh * (L - L_DIRECT) * D
                    kt = tl.load(kc_ptr + c_base + r[:, None] * D + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                    vt = tl.load(vc_ptr + c_base + r[:, None] * D + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                else:
                    rows = tl.load(idx_ptr + offs_l, mask=l_ok, other=0)  # landmark rows of k/v, gathered here
                    kt = tl.load(kl_base + rows[:, None] * skn + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                    vt = tl.load(vl_base + rows[:, None] * svn + offs_d[None, :], mask=l_ok[:, None], other=0.0)
                m_i, l_i, acc = _softmax_step(q, kt, vt, l_ok[None, :], m_i, l_i, acc, qk_scale, sq, vs, FP8)
            if WIN == 0:
                ol = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            else:
                # the same online softmax goes on over the patch's local windows (see _window_softmax)
                m_i, l_i, acc, num_u, den_u = _window_softmax(
                    q, kl_base, vl_base, lmf_ptr, offs_d, m_i, l_i, acc, pr, pc, n_cond, grid_h, grid_w, qk_scale,
                    skn, svn, fq1, fq2, pk_base, num_u, den_u, sq, vs, WIN, BLW, BM // PW, PW, MODE == 5, F1, IS_HH,
                    FP8)
                ol = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key at all (no landmarks, text row): 0
        if HAS_AFF and MODE != 5:
            ol = ol * (1.0 + tl.load(aff_ptr + b * 4 + 2)) + tl.load(aff_ptr + b * 4 + 3)
    # ---- blend epilogue ----------------------------------------------------------------------
    # GUARD (modes 0, 1, 3, 4: the passes that write the layer's output): rows not finite in the output's dtype are
    # replaced by the exact landmark branch's row (kernel-only: zeros) and `flag_ptr` is raised (_finite_rows)
    if MODE == 0:
        res = ok
        if GUARD:
            res = _finite_rows(ok, tl.zeros((BM, D), dtype=tl.float32), row_ok, flag_ptr, out_dtype)
        tl.store(o_ptrs, res.to(out_dtype), mask=row_ok[:, None])
    elif MODE == 1:
        lg = tl.minimum(tl.maximum(tl.load(logit_ptr + h * logit_h), -15.0), 15.0)
        a = alpha_max / (1.0 + tl.exp(-lg))
        res = ok + a * (ol - ok)
        if GUARD:
            res = _finite_rows(res, ol, row_ok, flag_ptr, out_dtype)
        tl.store(o_ptrs, res.to(out_dtype), mask=row_ok[:, None])
    elif MODE == 2:
        dd = _disagreement(ok, ol)
        tl.store(d_ptr + t_ptrs, dd, mask=row_ok)
        # the per-(b, h) sum of d for pass 2's mean: one relaxed add per tile (no reduce launch in between)
        tl.atomic_add(dsum_ptr + pid_bh, tl.sum(tl.where(row_ok, dd, 0.0), axis=0), sem="relaxed")
        tl.store(o_ptrs, ol.to(out_dtype), mask=row_ok[:, None])
    elif MODE == 5:
        num_u += _state_numerator(fq1, fq2, s_base, offs_f, offs_d, D, F1, IS_HH) / s_scale
        res = _shared_combine(ol, m_i, l_i, num_u, den_u, q_ptr + b * sqb + h * sqh, offs_m, offs_d, row_ok, sqn,
                              bq_ptr + h * D, tl.load(logit_ptr + h * logit_h), aff_ptr + b * 4, eps, HAS_AFF)
        if GUARD:
            res = _finite_rows(res, ol, row_ok, flag_ptr, out_dtype)
        tl.store(o_ptrs, res.to(out_dtype), mask=row_ok[:, None])
    elif MODE == 3:
        # adaptive pass 2: d from pass 1, its mean over this call's queries from pass 1's sum
        dd = tl.load(d_ptr + t_ptrs, mask=row_ok, other=0.0)
        mean = tl.load(dsum_ptr + pid_bh) / N
        res = _adaptive_blend(ok, ol, dd, mean, tl.load(logit_ptr + h * logit_h), gamma, alpha_max)
        if GUARD:
            res = _finite_rows(res, ol, row_ok, flag_ptr, out_dtype)
        tl.store(o_ptrs, res.to(out_dtype), mask=row_ok[:, None])
    else:
        # MODE 4, adaptive in one pass: the reference of d (the layer's running mean, per head in `dsum`) is
        # known before the call, so the blend needs no second pass over the queries
        res = _adaptive_blend(ok, ol, _disagreement(ok, ol), tl.load(dsum_ptr + h),
                              tl.load(logit_ptr + h * logit_h), gamma, alpha_max)
        if GUARD:
            res = _finite_rows(res, ol, row_ok, flag_ptr, out_dtype)
        tl.store(o_ptrs, res.to(out_dtype), mask=row_ok[:, None])


@triton.jit
def _landmark_softmax_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, N, L, H, sqb, sqh, sqn, sob, soh, son, qk_scale,
                             D: tl.constexpr, BM: tl.constexpr, BL: tl.constexpr, WS: tl.constexpr,
                             LSE: tl.constexpr):
    """out_l = softmax(q kᵀ / √D) v over the landmarks, per (query tile, batch·head), for the landmark pass to go
    on from (`landmark_impl = "tma"`, kernels/tma_landmarks.py): q rows and the contiguous landmark rows `[B·H, L,
    D]` (written by the key pass) come through tensor descriptors (TMA on Hopper), and the landmark loop is
    warp-specialised where WS (Triton ≥ 3.9 on sm_90 makes a producer warp group feeding two consumer groups of
    the 4 warps asked for). Scores past L are masked in the loop: the descriptor fills those rows with zeros, and
    a partial tile handled after the loop stops Triton from specialising it. With LSE each row's log-sum-exp
    (natural log, fp32 `[B·H, N]`)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_desc = tl.make_tensor_descriptor(q_ptr + b * sqb + h * sqh, shape=[N, D], strides=[sqn, 1], block_shape=[BM, D])
    k_desc = tl.make_tensor_descriptor(k_ptr + pid_bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BL, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + pid_bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BL, D])
    q = q_desc.load([pid_m * BM, 0])
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    for l0 in tl.range(0, L, BL, warp_specialize=WS):
        kt = k_desc.load([l0, 0])
        vt = v_desc.load([l0, 0])
        s = tl.dot(q, tl.trans(kt)) * qk_scale
        s = tl.where((l0 + tl.arange(0, BL) < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        a = tl.math.exp2(m_i - m_new)
        l_i = l_i * a + tl.sum(p, axis=1)
        acc = tl.dot(p.to(vt.dtype), vt, acc * a[:, None])
        m_i = m_new
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if LSE:
        tl.store(lse_ptr + pid_bh * N + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)
