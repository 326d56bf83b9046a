"""Decode attention straight from packed TurboQuant codes (Triton, CUDA; Triton interpreter on CPU).

    attend_codes(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids,
                 *, bits_k, bits_v, length, scale) -> (o_rot, lse)

A stored key is k_hat = s * (c[code] @ R_k), so <q, k_hat> = s * <q @ R_k.T, c[code]>: the query is
rotated once by the caller and every history token is scored from its codes; values are summed in
V's rotated space (the caller rotates the result once: out = o_rot @ R_v). Nothing is decoded to
memory: each program reads a KV head's codes once for all G query heads and Tq query rows sharing
it and dequantizes tiles in registers right before the tensor-core products.

Layout trick (why there is no unpacking shuffle): every bit plane of a b-bit code holds 8 codes per
"word" (4-bit plane: int32, 2-bit: int16, 1-bit: int8, 8-bit: int64), word i holding dims
8i .. 8i+7, code j of the word in bits w*j .. w*j+w-1. So the code of dim 8i+j is built from word i
of each plane with shifts and masks only, and the head dim is processed as 8 "slices" j = 0..7 of
D/8 dims each: scores = sum_j Q_j @ K_j^T and O_j = P @ V_j, where Q_j = q[:, j::8]. A dot product
does not care about the order of its terms, so no data ever moves between threads to undo the
packing; the output is written back interleaved (o[:, 8i+j] = O_j[:, i]).

Split-K (flash-decoding): the history is cut into `splits` ranges per (batch, KV head); each program
writes a partial (running max, running sum, unnormalised accumulator) and a second kernel merges
them with the log-sum-exp. Scores are kept in base 2 (scale * log2(e) folded in).

Centroid lookup: ``lut="asm"`` (default on CUDA for bits <= 4 and 16-bit queries) turns 8 codes
at a time into fp16 with byte permutes (``prmt``) from a table held in registers (compile-time
constants, see byte_tables): 2-bit codes select whole fp16 entries of a 4-entry window; 1/3-bit
codes index an 8-entry table; 4-bit codes use the symmetric codebook (c[15-i] = -c[i]): the low
three bits select one of 8 magnitudes and the top bit sets the sign. ``lut="load"`` reads the
centroid from a tiny table in L1 (any bits, fp32 queries, and the Triton interpreter; ~10x slower).

One warp per program, split count chosen to fill whole waves: see docs/kernels.md for the measured
numbers and what limits them.

Precision: 16-bit queries use fp16 tensor-core operands (bf16 queries convert exactly unless
|q| > 65504; centroids round to fp16, 2^-12 relative) with fp32 accumulation; fp32 queries use fp32
operands and ``tf32x3`` products (~fp32 accuracy; exact fp32 under the interpreter).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .device import num_sms

__all__ = ["attend_codes", "plane_widths", "packed_size"]

_LOG2E = 1.4426950408889634
MAX_TQ = 16


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit-plane widths of a ``bits``-bit code, widest first (tq_core.packing's layout)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return (8,) if bits == 8 else tuple(w for w in (4, 2, 1) if bits & w)


def packed_size(dim: int, bits: int) -> int:
    """Bytes of one packed vector: ceil(dim / 8) * bits."""
    return -(-dim // 8) * bits


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _load_plane(rowp, i, mask, OFF: tl.constexpr, WB: tl.constexpr, ALIGNED: tl.constexpr):
    """Word i of the plane starting OFF bytes into each row: (BLOCK_N, W) int32 (int64 for 8-bit).

    rowp: (BLOCK_N,) uint8 pointers to each token's packed row; WB: bytes per word (= plane width).
    """
    if ALIGNED:
        if WB == 4:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int32)) + i[None, :]
            w = tl.load(p, mask=mask, other=0)
        elif WB == 2:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int16)) + i[None, :]
            w = tl.load(p, mask=mask, other=0).to(tl.int32) & 0xFFFF
        elif WB == 1:
            p = rowp[:, None] + OFF + i[None, :]
            w = tl.load(p, mask=mask, other=0).to(tl.int32)
        else:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int64)) + i[None, :]
            w = tl.load(p, mask=mask, other=0)
    else:
        # Unaligned rows (odd strides or offsets): assemble each word from its bytes.
        base = rowp[:, None] + OFF + i[None, :] * WB
        if WB == 8:
            w = tl.load(base, mask=mask, other=0).to(tl.int64)
            for j in tl.static_range(1, WB):
                w = w | (tl.load(base + j, mask=mask, other=0).to(tl.int64) << (8 * j))
        else:
            w = tl.load(base, mask=mask, other=0).to(tl.int32)
            for j in tl.static_range(1, WB):
                w = w | (tl.load(base + j, mask=mask, other=0).to(tl.int32) << (8 * j))
    return w


@triton.jit
def _load_planes(rowp, i, mask, BITS: tl.constexpr, WREAL: tl.constexpr, ALIGNED: tl.constexpr):
    """The code words of every plane of a BITS-bit code as (w4, w2, w1, w8) (unused ones are 0)."""
    zero = tl.zeros(mask.shape, tl.int32)
    w4 = zero
    w2 = zero
    w1 = zero
    w8 = zero.to(tl.int64)
    if BITS == 8:
        w8 = _load_plane(rowp, i, mask, 0, 8, ALIGNED)
    else:
        if BITS & 4:
            w4 = _load_plane(rowp, i, mask, 0, 4, ALIGNED)
        OFF2: tl.constexpr = (BITS & 4) * WREAL
        if BITS & 2:
            w2 = _load_plane(rowp, i, mask, OFF2, 2, ALIGNED)
        OFF1: tl.constexpr = ((BITS & 4) + (BITS & 2)) * WREAL
        if BITS & 1:
            w1 = _load_plane(rowp, i, mask, OFF1, 1, ALIGNED)
    return w4, w2, w1, w8


@triton.jit
def _code(w4, w2, w1, w8, j: tl.constexpr, BITS: tl.constexpr):
    """Code of slice j (dims 8i+j) from the plane words, int32 (BLOCK_N, W)."""
    if BITS == 8:
        c = ((w8 >> (8 * j)) & 0xFF).to(tl.int32)
    else:
        c = tl.zeros(w4.shape, tl.int32)
        if BITS & 4:
            c = c | ((w4 >> (4 * j)) & 0xF)
        SH2: tl.constexpr = BITS & 4
        if BITS & 2:
            c = c | (((w2 >> (2 * j)) & 0x3) << SH2)
        SH1: tl.constexpr = (BITS & 4) + (BITS & 2)
        if BITS & 1:
            c = c | (((w1 >> j) & 0x1) << SH1)
    return c


@triton.jit
def _lookup_load(w4, w2, w1, w8, CENT, BITS: tl.constexpr, OPDT: tl.constexpr):
    """Centroids of the 8 slices by table loads (portable path): tuple of 8 (BLOCK_N, W) OPDT."""
    c0 = tl.load(CENT + _code(w4, w2, w1, w8, 0, BITS)).to(OPDT)
    c1 = tl.load(CENT + _code(w4, w2, w1, w8, 1, BITS)).to(OPDT)
    c2 = tl.load(CENT + _code(w4, w2, w1, w8, 2, BITS)).to(OPDT)
    c3 = tl.load(CENT + _code(w4, w2, w1, w8, 3, BITS)).to(OPDT)
    c4 = tl.load(CENT + _code(w4, w2, w1, w8, 4, BITS)).to(OPDT)
    c5 = tl.load(CENT + _code(w4, w2, w1, w8, 5, BITS)).to(OPDT)
    c6 = tl.load(CENT + _code(w4, w2, w1, w8, 6, BITS)).to(OPDT)
    c7 = tl.load(CENT + _code(w4, w2, w1, w8, 7, BITS)).to(OPDT)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _spread2(w):
    """8 two-bit fields (bits 2j..2j+1 of a 16-bit word) -> 8 nibbles (nibble j = field j)."""
    t = (w | (w << 8)) & 0x00FF00FF
    t = (t | (t << 4)) & 0x0F0F0F0F
    return (t | (t << 2)) & 0x33333333


@triton.jit
def _spread1(w):
    """8 bits of a byte -> bit 0 of 8 nibbles."""
    t = (w | (w << 12)) & 0x000F000F
    t = (t | (t << 6)) & 0x03030303
    return (t | (t << 3)) & 0x11111111


@triton.jit
def _nibbles(w4, w2, w1, BITS: tl.constexpr):
    """Codes (BITS <= 4) of a word as 8 nibbles of an int32: nibble j = code of dim 8i+j."""
    if BITS == 4:
        n = w4
    elif BITS == 3:
        n = _spread2(w2) | (_spread1(w1) << 2)
    elif BITS == 2:
        n = _spread2(w2)
    else:
        n = _spread1(w1)
    return n


# Byte-permute lookup of 8 codes per word, two words (a, b) per instance (pack=2): output j is the
# half2 (c[code_j(a)], c[code_j(b)]). Operands: $0..$7 outputs, $8/$9 nibble words a/b, then the
# four table words, each given twice (pack=2 duplicates scalars): $10, $12, $14, $16.
_ASM_LUT8_TEXT = """
{
.reg .b32 s, l, h;
""" + "".join(f"""
prmt.b32 s, $8, $9, {sel};
prmt.b32 l, $10, $12, s;
prmt.b32 h, $14, $16, s;
prmt.b32 ${2 * j}, l, h, 0x6240;
prmt.b32 ${2 * j + 1}, l, h, 0x7351;
""" for j, sel in enumerate(("0x0040", "0x0051", "0x0062", "0x0073"))) + "}"

# 4-bit codes with a symmetric codebook: magnitude index m = (n & 8) ? n & 7 : 7 - n, i.e.
# (~n & 7) ^ (7 if n & 8 else 0); the sign bit of the fp16 is set where n & 8 == 0. Sign bytes come
# from prmt's sign-replicate mode (selector nibble bit 3) on bytes whose msb is the code's bit 3.
_ASM_LUT16S_TEXT = """
{
.reg .b32 t, u, v, ia, ib, sa, sb, ea0, ea1, eb0, eb1, s, l, h, m;
and.b32 t, $8, 0x88888888;
shr.b32 u, t, 3;
sub.u32 v, t, u;
not.b32 ia, $8;
and.b32 ia, ia, 0x77777777;
xor.b32 ia, ia, v;
and.b32 t, $9, 0x88888888;
shr.b32 u, t, 3;
sub.u32 v, t, u;
not.b32 ib, $9;
and.b32 ib, ib, 0x77777777;
xor.b32 ib, ib, v;
shl.b32 sa, $8, 4;
prmt.b32 ea0, sa, $8, 0x5140;
prmt.b32 ea1, sa, $8, 0x7362;
shl.b32 sb, $9, 4;
prmt.b32 eb0, sb, $9, 0x5140;
prmt.b32 eb1, sb, $9, 0x7362;
""" + "".join(f"""
prmt.b32 s, ia, ib, {sel};
prmt.b32 l, $10, $12, s;
prmt.b32 h, $14, $16, s;
prmt.b32 m, {src}, {msel};
not.b32 m, m;
and.b32 m, m, 0x80808080;
xor.b32 h, h, m;
prmt.b32 ${2 * j}, l, h, 0x6240;
prmt.b32 ${2 * j + 1}, l, h, 0x7351;
""" for j, (sel, src, msel) in enumerate((("0x0040", "ea0, eb0", "0xDC98"), ("0x0051", "ea0, eb0", "0xFEBA"),
                                           ("0x0062", "ea1, eb1", "0xDC98"), ("0x0073", "ea1, eb1", "0xFEBA")))) + "}"


# 2-bit codes: the 4-entry fp16 table is one 8-byte prmt window (low bytes | high bytes), so a
# selector [c, c + 4] per value yields the whole fp16 and one prmt gives a half2. $8 holds the two
# 16-bit words a (low half) and b (high half); after byte-interleaving them, shifting by 2s and
# masking puts codes (a_s, b_s, a_s+4, b_s+4) in the 4 bytes, and c * 0x11 + 0x40 makes selectors.
# Operands: $0..$7 outputs, $8 words, $9/$10 low-byte word, $11/$12 high-byte word.
_ASM_LUT2_TEXT = """
{
.reg .b32 q, x, y, z;
prmt.b32 q, $8, 0, 0x3120;
""" + "".join(f"""
shr.b32 x, q, {2 * s};
and.b32 x, x, 0x03030303;
mad.lo.u32 y, x, 0x11, 0x40404040;
prmt.b32 ${s}, $9, $11, y;
shr.b32 z, y, 16;
prmt.b32 ${s + 4}, $9, $11, z;
""" for s in range(4)) + "}"

ASM_TEXTS = {"lut8": _ASM_LUT8_TEXT, "lut16s": _ASM_LUT16S_TEXT, "lut2": _ASM_LUT2_TEXT}

_ASM_LUT8 = tl.constexpr(_ASM_LUT8_TEXT)
_ASM_LUT2 = tl.constexpr(_ASM_LUT2_TEXT)
_ASM_LUT16S = tl.constexpr(_ASM_LUT16S_TEXT)


@triton.jit
def _lookup_asm(w4, w2, w1, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
                BITS: tl.constexpr):
    """Centroids of the 8 slices (BITS <= 4) via byte permutes: tuple of 8 (BLOCK_N, W) fp16.

    T0..T3: the fp16 table as 4 words (see byte_tables). They are compile-time constants: Triton
    only moves the dot-operand layout conversion up to the (small) code words, instead of
    round-tripping every dequantized fp16 tile through shared memory, when the other inputs of
    the elementwise chain are constants.
    """
    if BITS == 2:
        w = w2.to(tl.int16)
        u0 = tl.full(w.shape, T0, tl.int32)
        u2 = tl.full(w.shape, T2, tl.int32)
        out = tl.inline_asm_elementwise(
            _ASM_LUT2, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [w, u0, u2],
            dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        n = _nibbles(w4, w2, w1, BITS)
        t0 = tl.full(n.shape, T0, tl.int32)
        t1 = tl.full(n.shape, T1, tl.int32)
        t2 = tl.full(n.shape, T2, tl.int32)
        t3 = tl.full(n.shape, T3, tl.int32)
        if BITS == 4:
            out = tl.inline_asm_elementwise(
                _ASM_LUT16S, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [n, t0, t1, t2, t3],
                dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(
                _ASM_LUT8, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [n, t0, t1, t2, t3],
                dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    return out


@triton.jit
def _dequant(rowp, i, mask, CENT, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
             T3: tl.constexpr, BITS: tl.constexpr, WREAL: tl.constexpr,
             ALIGNED: tl.constexpr, USE_ASM: tl.constexpr, OPDT: tl.constexpr):
    w4, w2, w1, w8 = _load_planes(rowp, i, mask, BITS, WREAL, ALIGNED)
    if USE_ASM:
        vals = _lookup_asm(w4, w2, w1, T0, T1, T2, T3, BITS)
    else:
        vals = _lookup_load(w4, w2, w1, w8, CENT, BITS, OPDT)
    return vals


@triton.jit
def _q_slice(qrow, row_ok, i, j: tl.constexpr, s_qd, D: tl.constexpr, OPDT: tl.constexpr):
    d = 8 * i + j
    m = row_ok[:, None] & (d < D)[None, :]
    return tl.load(qrow[:, None] + d[None, :] * s_qd, mask=m, other=0.0).to(OPDT)


@triton.jit
def _store_slice(optr, acc, row_ok, i, j: tl.constexpr, D: tl.constexpr):
    d = 8 * i + j
    m = row_ok[:, None] & (d < D)[None, :]
    tl.store(optr[:, None] + d[None, :], acc, mask=m)


@triton.jit
def _attend_split_kernel(
    Q, s_qb, s_qh, s_qt, s_qd,
    KC, s_kcb, s_kch, s_kcn,
    KN, s_knb, s_knh, s_knn,
    VC, s_vcb, s_vch, s_vcn,
    VN, s_vnb, s_vnh, s_vnn,
    KCENT, VCENT,
    M_WS, L_WS, O_WS,
    length, LEN_PTR, len_base, tokens_per_split, qk_scale, HKV, n_splits,
    LEN_DEV: tl.constexpr, G: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, WREAL: tl.constexpr, W: tl.constexpr,
    BITS_K: tl.constexpr, BITS_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ASM_K: tl.constexpr, ASM_V: tl.constexpr, F32: tl.constexpr,
    ALIGNED_K: tl.constexpr, ALIGNED_V: tl.constexpr, TILES_CT: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, KT3: tl.constexpr,
    VT0: tl.constexpr, VT1: tl.constexpr, VT2: tl.constexpr, VT3: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    OPDT: tl.constexpr = tl.float32 if F32 else tl.float16
    PREC: tl.constexpr = "tf32x3" if F32 else "tf32"
    GT: tl.constexpr = G * TQ

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GT
    g = rows // TQ
    t = rows % TQ
    i = tl.arange(0, W)
    qrow = Q + b.to(tl.int64) * s_qb + (h * G + g).to(tl.int64) * s_qh + t.to(tl.int64) * s_qt
    q0 = _q_slice(qrow, row_ok, i, 0, s_qd, D, OPDT)
    q1 = _q_slice(qrow, row_ok, i, 1, s_qd, D, OPDT)
    q2 = _q_slice(qrow, row_ok, i, 2, s_qd, D, OPDT)
    q3 = _q_slice(qrow, row_ok, i, 3, s_qd, D, OPDT)
    q4 = _q_slice(qrow, row_ok, i, 4, s_qd, D, OPDT)
    q5 = _q_slice(qrow, row_ok, i, 5, s_qd, D, OPDT)
    q6 = _q_slice(qrow, row_ok, i, 6, s_qd, D, OPDT)
    q7 = _q_slice(qrow, row_ok, i, 7, s_qd, D, OPDT)

    kc = KC + b.to(tl.int64) * s_kcb + h.to(tl.int64) * s_kch
    kn = KN + b.to(tl.int64) * s_knb + h.to(tl.int64) * s_knh
    vc = VC + b.to(tl.int64) * s_vcb + h.to(tl.int64) * s_vch
    vn = VN + b.to(tl.int64) * s_vnb + h.to(tl.int64) * s_vnh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M, W], tl.float32)
    a1 = tl.zeros([BLOCK_M, W], tl.float32)
    a2 = tl.zeros([BLOCK_M, W], tl.float32)
    a3 = tl.zeros([BLOCK_M, W], tl.float32)
    a4 = tl.zeros([BLOCK_M, W], tl.float32)
    a5 = tl.zeros([BLOCK_M, W], tl.float32)
    a6 = tl.zeros([BLOCK_M, W], tl.float32)
    a7 = tl.zeros([BLOCK_M, W], tl.float32)

    # Every split but the last is full; the last one stops after its last valid tile. With the
    # length read from the device (LEN_DEV: a CUDA graph replays one grid, sized for the buffers'
    # capacity, while the history grows), splits past it run no tile and leave m = -inf, l = 0,
    # which the merge weighs 0. Under the interpreter the trip count is a constexpr (its scalars are
    # 1-element arrays that recent numpy refuses to turn into a loop bound) and tiles past the
    # length are masked out, the running max kept finite by ``m_safe``.
    if LEN_DEV:
        length = len_base + tl.load(LEN_PTR)
    start = pid_s * tokens_per_split
    n_tiles = tl.cdiv(tl.maximum(tl.minimum(length - start, tokens_per_split), 0), BLOCK_N)
    wmask_i = (i < WREAL)[None, :]
    for it in range(0, TILES_CT if TILES_CT > 0 else n_tiles):
        n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < length
        n64 = n.to(tl.int64)
        wmask = nmask[:, None] & wmask_i
        k = _dequant(kc + n64 * s_kcn, i, wmask, KCENT, KT0, KT1, KT2, KT3, BITS_K, WREAL, ALIGNED_K, ASM_K, OPDT)
        s = tl.dot(q0, tl.trans(k[0]), input_precision=PREC)
        s = tl.dot(q1, tl.trans(k[1]), s, input_precision=PREC)
        s = tl.dot(q2, tl.trans(k[2]), s, input_precision=PREC)
        s = tl.dot(q3, tl.trans(k[3]), s, input_precision=PREC)
        s = tl.dot(q4, tl.trans(k[4]), s, input_precision=PREC)
        s = tl.dot(q5, tl.trans(k[5]), s, input_precision=PREC)
        s = tl.dot(q6, tl.trans(k[6]), s, input_precision=PREC)
        s = tl.dot(q7, tl.trans(k[7]), s, input_precision=PREC)
        knorm = tl.load(kn + n64 * s_knn, mask=nmask, other=0.0).to(tl.float32)
        s = s * (knorm * qk_scale)[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        vnorm = tl.load(vn + n64 * s_vnn, mask=nmask, other=0.0).to(tl.float32)
        pv = (p * vnorm[None, :]).to(OPDT)
        v = _dequant(vc + n64 * s_vcn, i, wmask, VCENT, VT0, VT1, VT2, VT3, BITS_V, WREAL, ALIGNED_V, ASM_V, OPDT)
        al = alpha[:, None]
        a0 = tl.dot(pv, v[0], a0 * al, input_precision=PREC)
        a1 = tl.dot(pv, v[1], a1 * al, input_precision=PREC)
        a2 = tl.dot(pv, v[2], a2 * al, input_precision=PREC)
        a3 = tl.dot(pv, v[3], a3 * al, input_precision=PREC)
        a4 = tl.dot(pv, v[4], a4 * al, input_precision=PREC)
        a5 = tl.dot(pv, v[5], a5 * al, input_precision=PREC)
        a6 = tl.dot(pv, v[6], a6 * al, input_precision=PREC)
        a7 = tl.dot(pv, v[7], a7 * al, input_precision=PREC)

    ws = pid_bh.to(tl.int64) * n_splits + pid_s
    tl.store(M_WS + ws * GT + rows, m_i, mask=row_ok)
    tl.store(L_WS + ws * GT + rows, l_i, mask=row_ok)
    optr = O_WS + (ws * GT + rows.to(tl.int64)) * D
    _store_slice(optr, a0, row_ok, i, 0, D)
    _store_slice(optr, a1, row_ok, i, 1, D)
    _store_slice(optr, a2, row_ok, i, 2, D)
    _store_slice(optr, a3, row_ok, i, 3, D)
    _store_slice(optr, a4, row_ok, i, 4, D)
    _store_slice(optr, a5, row_ok, i, 5, D)
    _store_slice(optr, a6, row_ok, i, 6, D)
    _store_slice(optr, a7, row_ok, i, 7, D)


@triton.jit
def _merge_kernel(M_WS, L_WS, O_WS, O, LSE, n_splits, HKV,
                  G: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS_CT: tl.constexpr):
    """Merge the split partials of one (batch, KV head, query row): log-sum-exp weights for all
    splits at once, then the weighted sum of their accumulators, BLOCK_S splits per step."""
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    GT: tl.constexpr = G * TQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    sp = tl.arange(0, BLOCK_S)
    base = pid_bh.to(tl.int64) * n_splits
    # Pass 1: the global max over splits.
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    n_chunks = tl.cdiv(n_splits, BLOCK_S)
    for ch in range(0, CHUNKS_CT if CHUNKS_CT > 0 else n_chunks):
        s_i = ch * BLOCK_S + sp
        m = tl.maximum(m, tl.load(M_WS + (base + s_i) * GT + r, mask=s_i < n_splits, other=float("-inf")))
    m_all = tl.max(m, 0)
    ref = tl.where(m_all > float("-inf"), m_all, 0.0)  # no -inf - -inf: empty rows stay 0
    # Pass 2: weights 2^(m_s - max), sum of l and of the accumulators.
    l = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for ch in range(0, CHUNKS_CT if CHUNKS_CT > 0 else n_chunks):
        s_i = ch * BLOCK_S + sp
        ok = s_i < n_splits
        w = tl.exp2(tl.load(M_WS + (base + s_i) * GT + r, mask=ok, other=float("-inf")) - ref)
        l += w * tl.load(L_WS + (base + s_i) * GT + r, mask=ok, other=0.0)
        o_s = tl.load(O_WS + ((base + s_i) * GT + r)[:, None] * D + d[None, :],
                      mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * o_s
    l_all = tl.sum(l, 0)
    o = tl.sum(acc, 0)
    nonempty = l_all > 0
    out = o / tl.where(nonempty, l_all, 1.0)
    lse = tl.where(nonempty, (m_all + tl.log2(tl.where(nonempty, l_all, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    b = pid_bh // HKV
    h = pid_bh % HKV
    g = r // TQ
    t = r % TQ
    orow = ((b * HKV + h) * G + g).to(tl.int64) * TQ + t  # (B, Hq, Tq) flattened, Hq = HKV * G
    tl.store(O + orow * D + d, out, mask=d_ok)
    tl.store(LSE + orow, lse)


# --------------------------------------------------------------------------- host side


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _aligned(codes: torch.Tensor, bits: int) -> bool:
    """Whether every plane's words of ``codes`` are naturally aligned (word loads are legal)."""
    wb = 8 if bits == 8 else max(plane_widths(bits))
    if codes.data_ptr() % wb:
        return False
    return all(st % wb == 0 for st, n in zip(codes.stride()[:3], codes.shape[:3]) if n > 1)


def byte_tables(centroids, bits: int) -> tuple[int, int, int, int]:
    """The fp16 centroid table of the byte-permute lookup as 4 int32 words (compile-time constants).

    ``centroids``: the codebook, a (2**bits,) tensor or array. Entries: c[0 .. 2^bits - 1] for
    bits <= 3 (unused slots 0); the magnitudes c[8 .. 15] for bits == 4, whose lookup relies on the
    codebook's symmetry c[15 - i] = -c[i] (checked here). Words: low bytes of entries 0-3, of
    entries 4-7, high bytes of entries 0-3, of entries 4-7. A device tensor is copied to the host
    (one sync): callers that attend repeatedly compute the tables once and pass them in.
    """
    c = torch.as_tensor(np.array(centroids) if isinstance(centroids, np.ndarray) else centroids)
    c = c.detach().to("cpu", torch.float32)
    if bits == 4:
        if not torch.equal(c.flip(0), -c):
            raise ValueError("lut='asm' with 4-bit codes needs a symmetric codebook (c[15-i] == -c[i]); "
                             "use lut='load'")
        entries = c[8:]
    else:
        entries = torch.zeros(8)
        entries[: 2 ** bits] = c
    e = entries.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    words = []
    for part in (e & 0xFF, e >> 8):
        for half in (part[:4], part[4:]):
            w = sum(int(v) << (8 * k) for k, v in enumerate(half.tolist()))
            words.append(w - (1 << 32) if w >= 1 << 31 else w)  # as a signed int32 constant
    return words[0], words[1], words[2], words[3]


def _num_sms(device: torch.device) -> int:
    return num_sms(device, cpu=8)


def _check_codes(name, codes, norms, B, Hkv, D, bits, length):
    if codes.dtype != torch.uint8 or codes.dim() != 4:
        raise ValueError(f"{name}_codes must be a (B, Hkv, cap, bytes) uint8 tensor, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    nb = packed_size(D, bits)
    if codes.shape[0] != B or codes.shape[1] != Hkv or codes.shape[3] != nb:
        raise ValueError(f"{name}_codes must have shape ({B}, {Hkv}, cap, {nb}) for dim={D}, "
                         f"bits={bits}; got {tuple(codes.shape)}")
    if codes.stride(3) != 1:
        raise ValueError(f"{name}_codes must be contiguous along its last axis")
    if norms.dim() != 3 or tuple(norms.shape[:2]) != (B, Hkv) or norms.shape[2] != codes.shape[2]:
        raise ValueError(f"{name}_norms must have shape ({B}, {Hkv}, {codes.shape[2]}), "
                         f"got {tuple(norms.shape)}")
    if not 0 <= length <= codes.shape[2]:
        raise ValueError(f"length must be in 0..cap={codes.shape[2]}, got {length}")


def attend_codes(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, *,
                 bits_k: int, bits_v: int, length: int, scale: float,
                 lut: str | None = None, block_n: int | None = None, splits: int | None = None,
                 num_warps: int = 1, num_stages: int = 2, maxnreg: int | None = None, out=None,
                 k_table=None, v_table=None):
    """Attention of rotated queries over a packed TurboQuant history.

    Args:
        q_rot: (B, Hq, Tq, D) float32 / bf16 / fp16, queries rotated by K's rotation (q @ R_k.T);
            Hq = Hkv * G, query head h reads KV head h // G; Tq <= 16.
        k_codes, v_codes: (B, Hkv, cap, packed_size(D, bits)) uint8, any strides on the first three
            axes, last axis contiguous; only the first ``length`` tokens are read.
        k_norms, v_norms: (B, Hkv, cap) float16 stored norms.
        k_centroids, v_centroids: (2**bits,) float32 codebooks on the same device.
        bits_k, bits_v: code widths (1..8). length: valid tokens (0..cap). scale: score scale.
        lut: "asm" (byte-permute lookup; CUDA, 16-bit queries, bits <= 4, symmetric 4-bit codebook)
            or "load" (table loads; anything). Default: "asm" where it applies.
        block_n, splits, num_warps, num_stages, maxnreg: tuning knobs (defaults per shape).
            One warp per program is deliberate: with M = G*Tq <= 16 query rows, Triton's MMA
            layout gives every extra warp of a program a copy of the same work.
        out: optional (o_rot, lse) float32 tensors of the result shapes to write into.
        k_table, v_table: ``byte_tables`` of the codebooks, when the caller keeps them (else they
            are computed from the centroid tensors, one host copy each).

    Returns:
        o_rot: (B, Hq, Tq, D) float32 = sum_j softmax_j(s) * v_norm_j * c_v[v_code_j] (V's rotated
            space; zero when length == 0) and lse: (B, Hq, Tq) float32 = logsumexp_j s_j with
            s_j = scale * k_norm_j * <q_rot, c_k[k_code_j]> (-inf when length == 0).
    """
    if q_rot.dim() != 4:
        raise ValueError(f"q_rot must be (B, Hq, Tq, D), got shape {tuple(q_rot.shape)}")
    if q_rot.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q_rot must be float32, bfloat16 or float16, got {q_rot.dtype}")
    B, Hq, Tq, D = q_rot.shape
    length = int(length)
    plane_widths(bits_k), plane_widths(bits_v)
    Hkv = k_codes.shape[1] if k_codes.dim() == 4 else -1
    _check_codes("k", k_codes, k_norms, B, Hkv, D, bits_k, length)
    _check_codes("v", v_codes, v_norms, B, Hkv, D, bits_v, length)
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if not 1 <= Tq <= MAX_TQ:
        raise ValueError(f"Tq must be in 1..{MAX_TQ}, got {Tq}")
    if k_norms.dtype != torch.float16 or v_norms.dtype != torch.float16:
        raise ValueError("k_norms and v_norms must be float16")
    for name, c, bits in (("k_centroids", k_centroids, bits_k), ("v_centroids", v_centroids, bits_v)):
        if c.dim() != 1 or c.numel() != 2 ** bits or c.dtype != torch.float32:
            raise ValueError(f"{name} must be a ({2 ** bits},) float32 tensor, got {c.dtype} "
                             f"{tuple(c.shape)}")
    dev = q_rot.device
    for tname, ten in (("k_codes", k_codes), ("v_codes", v_codes), ("k_norms", k_norms),
                       ("v_norms", v_norms), ("k_centroids", k_centroids), ("v_centroids", v_centroids)):
        if ten.device != dev:
            raise ValueError(f"{tname} is on {ten.device}, q_rot on {dev}")
    G = Hq // Hkv
    interp = _interpreting()
    _check_lut(lut, q_rot)
    if out is None:
        o = torch.empty((B, Hq, Tq, D), device=dev, dtype=torch.float32)
        lse = torch.empty((B, Hq, Tq), device=dev, dtype=torch.float32)
    else:
        o, lse = out
        if (tuple(o.shape) != (B, Hq, Tq, D) or tuple(lse.shape) != (B, Hq, Tq) or o.dtype != torch.float32
                or lse.dtype != torch.float32 or not o.is_contiguous() or not lse.is_contiguous()):
            raise ValueError("out must be contiguous float32 tensors of shapes (B, Hq, Tq, D) and (B, Hq, Tq)")
    if length == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    ws_m, ws_l, ws_o, splits = _launch_splits(
        q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, bits_k=bits_k, bits_v=bits_v,
        length=length, scale=scale, lut=lut, block_n=block_n, splits=splits, num_warps=num_warps,
        num_stages=num_stages, maxnreg=maxnreg, k_table=k_table, v_table=v_table)
    BH, GT = B * Hkv, G * Tq
    block_s = min(16, _next_pow2(splits))
    n_chunks = -(-splits // block_s)
    _merge_kernel[(BH, GT)](
        ws_m, ws_l, ws_o, o, lse, splits, Hkv, G=G, TQ=Tq, D=D,
        BLOCK_S=block_s, BLOCK_D=_next_pow2(D), CHUNKS_CT=n_chunks if interp else 0,
        **({} if interp else {"num_warps": 4}))
    return o, lse


def _check_lut(lut, q_rot) -> str:
    """The centroid lookup to use: ``lut`` checked, or the default where it applies."""
    asm_ok = (not _interpreting()) and q_rot.dtype != torch.float32 and q_rot.device.type == "cuda"
    if lut is None:
        lut = "asm" if asm_ok else "load"
    if lut not in ("asm", "load"):
        raise ValueError(f"lut must be 'asm' or 'load', got {lut!r}")
    if lut == "asm" and not asm_ok:
        raise ValueError("lut='asm' needs a CUDA device, 16-bit queries and no Triton interpreter")
    return lut


def _launch_splits(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, *, bits_k, bits_v,
                   length, scale, lut=None, block_n=None, splits=None, num_warps=1, num_stages=2,
                   maxnreg=None, k_table=None, v_table=None, length_dev=None, length_base=0):
    """Run the split kernel over ``length`` > 0 held tokens (arguments checked by the caller):
    (m, l, o) partials per (batch x KV head, split, query row) in base 2, and the split count.
    ``length_dev``: a (1,) int64 tensor on the device; ``length_base + length_dev`` tokens are read
    (at most ``length``, which then sizes the grid): what a CUDA graph replays while the history
    grows."""
    B, Hq, Tq, D = q_rot.shape
    Hkv = k_codes.shape[1]
    dev = q_rot.device
    G = Hq // Hkv
    GT = G * Tq
    f32 = q_rot.dtype == torch.float32
    interp = _interpreting()
    lut = _check_lut(lut, q_rot)
    asm_k = lut == "asm" and bits_k <= 4
    asm_v = lut == "asm" and bits_v <= 4

    kt = (k_table or byte_tables(k_centroids, bits_k)) if asm_k else (0, 0, 0, 0)
    vt = (v_table or byte_tables(v_centroids, bits_v)) if asm_v else (0, 0, 0, 0)
    wreal = -(-D // 8)
    W = max(16, _next_pow2(wreal))
    BLOCK_M = max(16, _next_pow2(GT))
    if block_n is None:
        block_n = 32 if (f32 or BLOCK_M > 16 or W > 16) else 64
    n_tiles = -(-length // block_n)
    BH = B * Hkv
    if splits is None:
        # One-warp programs of ~216 registers: 8 are resident per SM, so a "wave" is 8 * SMs.
        # Fill two waves without spilling into a third (a 3 % tail wave costs a whole program
        # time: measured 188 us vs 135 us at 8 x 32k), keeping >= 4 tiles per program, except
        # where one tile per program still fits one wave (short histories: the step's latency is
        # then one tile's, not four).
        wave = 8 * _num_sms(dev)
        splits = max(1, min((2 * wave) // BH, max(-(-n_tiles // 4), min(n_tiles, wave // BH)), 512))
    splits = max(1, min(int(splits), max(n_tiles, 1)))
    tiles_per_split = -(-max(n_tiles, 1) // splits)
    tps = tiles_per_split * block_n
    splits = max(1, -(-length // tps))

    ws_m = torch.empty((BH, splits, GT), device=dev, dtype=torch.float32)
    ws_l = torch.empty_like(ws_m)
    ws_o = torch.empty((BH, splits, GT, D), device=dev, dtype=torch.float32)

    kern_kw = {} if interp else {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg and not interp:
        kern_kw["maxnreg"] = int(maxnreg)
    _attend_split_kernel[(splits, BH)](
        q_rot, *q_rot.stride(),
        k_codes, *k_codes.stride()[:3],
        k_norms, *k_norms.stride(),
        v_codes, *v_codes.stride()[:3],
        v_norms, *v_norms.stride(),
        k_centroids, v_centroids,
        ws_m, ws_l, ws_o,
        length, q_rot if length_dev is None else length_dev, int(length_base), tps, float(scale) * _LOG2E, Hkv, splits,
        LEN_DEV=length_dev is not None, G=G, TQ=Tq, D=D, WREAL=wreal, W=W, BITS_K=bits_k, BITS_V=bits_v,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, ASM_K=asm_k, ASM_V=asm_v, F32=f32,
        ALIGNED_K=_aligned(k_codes, bits_k), ALIGNED_V=_aligned(v_codes, bits_v),
        TILES_CT=tiles_per_split if interp else 0,
        KT0=kt[0], KT1=kt[1], KT2=kt[2], KT3=kt[3], VT0=vt[0], VT1=vt[1], VT2=vt[2], VT3=vt[3],
        **kern_kw,
    )
    return ws_m, ws_l, ws_o, splits
