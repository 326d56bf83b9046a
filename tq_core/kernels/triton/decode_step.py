"""One attention call of a compressed layer in two kernel launches (Triton, CUDA; the interpreter on CPU).

    attend_step(q, q_rot, scale, hist, dense, ...) -> out (B, Hq, Tq, D) in q's dtype

What a layer holds is [sinks | history (packed codes) | window] plus the call's own tokens. The
history is read by ``decode_attention``'s split kernel (rotated query, scores from codes, values
summed in V's rotated space, one partial per split). A second kernel, one program per (batch, KV
head, query row), then does everything else a decode step needs, which array ops would spend some forty small
launches on:

1. merges the history's split partials (log-sum-exp weights, base 2) and rotates that output back
   to the original space once (``o @ R_v``, 32 columns at a time as they are summed);
2. attends the same queries, unrotated, over the full-precision tokens: up to three segments
   (sinks, window, the call's own tokens; the last one causal among the queries, which are the last
   ``Tq`` of its tokens), with an online softmax, float32 products;
3. joins both parts by their running maxima and sums and writes the output in the query's dtype.

The two parts share one softmax exactly as ``kvstore.View.attend`` defines it; parity tests hold
this path to the array-ops path over the same stored codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..step_args import MAX_DIM, MAX_ROWS, step_shape
from .decode_attention import _LOG2E, _check_lut, _interpreting, _launch_splits, _next_pow2

__all__ = ["attend_step", "MAX_ROWS", "MAX_DIM"]



@triton.jit
def _dense_segment(q, m_i, l_i, acc, K, s_kb, s_kh, s_kn, s_kd, V, s_vb, s_vh, s_vn, s_vd, n,
                   b, h, d, d_ok, t, shift, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, INTERP: tl.constexpr,
                   TILES_CT: tl.constexpr):
    """Online softmax of one query row ``q`` (BD,) over ``n`` full-precision tokens of one segment."""
    kb = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vb = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    # The weighted values stay a (BLOCK_N, BD) tile across tiles, summed over tokens once at the
    # end: a sum over the token axis crosses warps (a shared-memory round trip), one per segment
    # instead of one per tile.
    acc2 = tl.zeros([BLOCK_N, BD], tl.float32)
    for it in range(0, TILES_CT if INTERP else tl.cdiv(n, BLOCK_N)):
        nn = it * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < n
        n64 = nn.to(tl.int64)
        lm = nmask[:, None] & d_ok[None, :]
        k = tl.load(kb + n64[:, None] * s_kn + d[None, :] * s_kd, mask=lm, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * qk_scale
        ok = nmask
        if CAUSAL:
            ok = ok & (nn <= t + shift)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(vb + n64[:, None] * s_vn + d[None, :] * s_vd, mask=lm, other=0.0).to(tl.float32)
        acc2 = acc2 * alpha + p[:, None] * v
        acc = acc * alpha
        m_i = m_new
    return m_i, l_i, acc + tl.sum(acc2, 0)


@triton.jit
def _step_kernel(
    M_WS, L_WS, O_WS, n_splits, RV,
    Q, s_qb, s_qh, s_qt, s_qd,
    K0, s_k0b, s_k0h, s_k0n, s_k0d, V0, s_v0b, s_v0h, s_v0n, s_v0d, n0,
    K1, s_k1b, s_k1h, s_k1n, s_k1d, V1, s_v1b, s_v1h, s_v1n, s_v1d, n1,
    K2, s_k2b, s_k2h, s_k2n, s_k2d, V2, s_v2b, s_v2h, s_v2n, s_v2d, n2,
    OUT, s_ob, s_oh, s_ot, s_od,
    qk_scale, HKV, shift,
    G: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SP: tl.constexpr, CS: tl.constexpr, DC: tl.constexpr, HAS_HIST: tl.constexpr, INTERP: tl.constexpr,
    T0_CT: tl.constexpr, T1_CT: tl.constexpr, T2_CT: tl.constexpr,
):
    """One program per (batch x KV head, query row): float32 products throughout (no tensor cores:
    one row reads a few hundred full-precision tokens and a (D, D) rotation, all from L2). Sums over
    tokens and splits, which cross warps through shared memory, are taken once per segment and
    once per merge rather than per tile or per load (per-tile sums cost 14-way bank conflicts and
    ~19 us of 33 at 1 x 32k on the H200)."""
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    GT: tl.constexpr = G * TQ
    g = r // TQ
    t = r % TQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qrow = b.to(tl.int64) * s_qb + (h * G + g).to(tl.int64) * s_qh + t.to(tl.int64) * s_qt
    q = tl.load(Q + qrow + d * s_qd, mask=d_ok, other=0.0).to(tl.float32)

    if HAS_HIST:
        # the merge's first loads, issued before the full-precision tokens' loop
        base = pid_bh.to(tl.int64) * n_splits
        sp = tl.arange(0, SP)
        m_v = tl.load(M_WS + (base + sp) * GT + r, mask=sp < n_splits, other=float("-inf"))
        l_v = tl.load(L_WS + (base + sp) * GT + r, mask=sp < n_splits, other=0.0)

    # The full-precision tokens, in the original space.
    m_d = tl.full([], float("-inf"), tl.float32)
    l_d = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    m_d, l_d, acc = _dense_segment(q, m_d, l_d, acc, K0, s_k0b, s_k0h, s_k0n, s_k0d, V0, s_v0b, s_v0h, s_v0n,
                                   s_v0d, n0, b, h, d, d_ok, t, shift, qk_scale, False, BLOCK_N, BLOCK_D, INTERP, T0_CT)
    m_d, l_d, acc = _dense_segment(q, m_d, l_d, acc, K1, s_k1b, s_k1h, s_k1n, s_k1d, V1, s_v1b, s_v1h, s_v1n,
                                   s_v1d, n1, b, h, d, d_ok, t, shift, qk_scale, False, BLOCK_N, BLOCK_D, INTERP, T1_CT)
    m_d, l_d, acc = _dense_segment(q, m_d, l_d, acc, K2, s_k2b, s_k2h, s_k2n, s_k2d, V2, s_v2b, s_v2h, s_v2n,
                                   s_v2d, n2, b, h, d, d_ok, t, shift, qk_scale, True, BLOCK_N, BLOCK_D, INTERP, T2_CT)

    if HAS_HIST:
        # The history: merge this row's split partials and rotate the result back once. Every load
        # has its address up front (the split count's power of two SP and the chunk sizes are
        # compile-time, the loops unrolled), so the loads of all splits are in flight together
        # instead of one dependent round trip per chunk of splits.
        m_h = tl.max(m_v, 0)
        m_hs = tl.where(m_h > float("-inf"), m_h, 0.0)
        l_h = tl.sum(tl.exp2(m_v - m_hs) * l_v, 0)
        o_h = tl.zeros([BLOCK_D], tl.float32)
        dc = tl.arange(0, DC)
        cs = tl.arange(0, CS)
        for c in tl.static_range(BLOCK_D // DC):
            # DC columns of V's rotated space summed over all splits, CS splits per load, then
            # multiplied by the matching DC rows of R_v (one chunk when head_dim <= 128)
            col = c * DC + dc
            col_ok = col < D
            oc2 = tl.zeros([CS, DC], tl.float32)  # summed over splits once, after the loads
            for sc in tl.static_range(SP // CS):
                s_i = sc * CS + cs
                ok = s_i < n_splits
                w = tl.exp2(tl.load(M_WS + (base + s_i) * GT + r, mask=ok, other=float("-inf")) - m_hs)
                o_s = tl.load(O_WS + ((base + s_i) * GT + r)[:, None] * D + col[None, :],
                              mask=ok[:, None] & col_ok[None, :], other=0.0)
                oc2 += w[:, None] * o_s
            oc = tl.sum(oc2, 0)
            r_v = tl.load(RV + col[:, None] * D + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            o_h += tl.sum(oc[:, None] * r_v, 0)
        m = tl.maximum(m_h, m_d)
        ms = tl.where(m > float("-inf"), m, 0.0)
        wh = tl.exp2(m_h - ms)
        wd = tl.exp2(m_d - ms)
        num = o_h * wh + acc * wd
        den = l_h * wh + l_d * wd
    else:
        num = acc
        den = l_d
    out = num / tl.where(den > 0, den, 1.0)
    orow = b.to(tl.int64) * s_ob + (h * G + g).to(tl.int64) * s_oh + t.to(tl.int64) * s_ot
    tl.store(OUT + orow + d * s_od, out.to(OUT.dtype.element_ty), mask=d_ok)


def attend_step(q, scale: float, dense, *, q_rot=None, hist=None, length: int = 0, rot_v=None,
                bits_k: int = 0, bits_v: int = 0, k_centroids=None, v_centroids=None, k_table=None,
                v_table=None, lut: str | None = None, length_dev=None, length_base: int = 0, out=None,
                num_warps: int | None = None, block_n: int = 64, splits: int | None = None):
    """Attention of ``q`` (B, Hq, Tq, D) over a compressed layer, in two launches.

    Args:
        q: the queries, unscaled, in the model's dtype (the output's dtype).
        scale: score scale (1/sqrt(D) unless the model says otherwise).
        dense: three (k, v) pairs or None, each (B, Hkv, n_i, D), any float dtype and strides: the
            sinks, the window and the call's own tokens, in key order. The queries are the last
            ``Tq`` of the own tokens: row t reads own token i when i <= t + (n_own - Tq).
        q_rot: the queries rotated by K's rotation (q @ R_k.T, unscaled; float32 or 16-bit: see
            ``decode_attention.attend_codes``); hist: (k_codes, k_norms, v_codes, v_norms) of the
            history; length: its held tokens (0: no history, then q_rot and hist are not read);
            rot_v: V's rotation (D, D) float32 (o = o_rot @ rot_v); bits, centroids, tables and
            ``lut`` as for ``attend_codes``.
        length_dev, length_base: optional (1,) int64 device tensor t: the history's held tokens are
            ``length_base + t``, read on the device (1..``length``; ``length`` then sizes the grid),
            so a CUDA graph of the call stays valid as the history grows.
        out: optional (B, Hq, Tq, D) tensor in ``q``'s dtype to write into.
        num_warps, block_n: the second kernel's warps and full-precision tokens per tile; splits:
            the history's split count (tuning knobs; defaults per shape).

    Returns: (B, Hq, Tq, D) in ``q``'s dtype.
    """
    B, Hq, Tq, D, Hkv, G = step_shape(q, dense, hist, length)
    interp = _interpreting()
    dev = q.device
    BH = B * Hkv
    BLOCK_D = max(16, _next_pow2(D))
    BLOCK_N = int(block_n)
    if length:
        _check_lut(lut, q_rot)
        k_codes, k_norms, v_codes, v_norms = hist
        ws_m, ws_l, ws_o, splits = _launch_splits(
            q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, bits_k=bits_k, bits_v=bits_v,
            length=int(length), scale=scale, lut=lut, k_table=k_table, v_table=v_table, length_dev=length_dev, length_base=length_base,
            splits=splits)
        if tuple(rot_v.shape) != (D, D) or rot_v.dtype != torch.float32 or not rot_v.is_contiguous():
            raise ValueError(f"rot_v must be a contiguous ({D}, {D}) float32 tensor")
    else:
        ws_m = ws_l = ws_o = rot_v = q  # not read
        splits = 0
    if out is None:
        out = torch.empty((B, Hq, Tq, D), device=dev, dtype=q.dtype)
    elif tuple(out.shape) != (B, Hq, Tq, D) or out.dtype != q.dtype or out.device != dev:
        raise ValueError(f"out must be a ({B}, {Hq}, {Tq}, {D}) {q.dtype} tensor on {dev}")
    seg_args, tiles = [], []
    for kv in dense:
        if kv is None:
            seg_args += [q, 0, 0, 0, 0, q, 0, 0, 0, 0, 0]  # n = 0: never read
            tiles.append(0)
        else:
            k, v = kv
            seg_args += [k, *k.stride(), v, *v.stride(), k.shape[2]]
            tiles.append(-(-k.shape[2] // BLOCK_N))
    n_own = 0 if dense[2] is None else dense[2][0].shape[2]
    SP = max(16, _next_pow2(splits))  # the split count's power of two: one compiled merge per power
    DC = BLOCK_D if BLOCK_D <= 128 else 64  # rotated-space columns merged and rotated back per chunk
    _step_kernel[(BH, G * Tq)](
        ws_m, ws_l, ws_o, splits, rot_v,
        q, *q.stride(), *seg_args, out, *out.stride(),
        float(scale) * _LOG2E, Hkv, n_own - Tq,
        G=G, TQ=Tq, D=D, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, SP=SP, CS=16, DC=DC,
        HAS_HIST=bool(length), INTERP=interp,
        T0_CT=tiles[0] if interp else 0, T1_CT=tiles[1] if interp else 0, T2_CT=tiles[2] if interp else 0,
        # 4 warps merge up to 128 splits fastest, 8 more (H200: 10.1 vs 13.4 us at 1 x 32k, 128
        # splits; 23.8 vs 18.2 us at 1 x 128k, 512 splits)
        **({} if interp else {"num_warps": int(num_warps or (4 if SP <= 128 else 8))}))
    return out
