"""Fused TurboQuant encode (Triton, CUDA; Triton interpreter on CPU).

    encode_into(x, rot_t, boundaries, centroids, *, bits, norm_correction, codes_out, norms_out)

One pass per block of rows: norm, rotation on the tensor cores, bucketize, norm correction and bit
packing, writing the cache's packed codes and fp16 norms in place. Same meaning as
``TurboQuantizer(dim, bits, seed).encode(x)``: n = |x|; y = (x @ R.T) / max(n, 1e-30);
code_i = #{boundaries < y_i}; stored = n / |c[code]| (norm correction) or n, as fp16.

Precision of the rotation: a single bf16 (or tf32) product rounds R to 8 (10) bits and moves a
coordinate by ~1e-3 of its size, flipping ~1 % of the codes that sit near a boundary. R is split
into three bf16 pieces R = R1 + R2 + R3 (24 significant bits, float32's precision) and x into as
many bf16 pieces as its dtype needs (bf16: 1, exact; fp16: 2, exact; fp32: 3, exact), and the
products x_i @ R_j with i + j <= 2 (0-based) are summed in fp32: every dropped term is below
2^-24 of the result, so the codes match a float32 reference except where float32 rounding itself
decides (coordinates within ~1e-7 of a boundary).

Packing (tq_core.packing): planes of widths (4, 2, 1) (8: one byte per code), widest first; a
w-bit plane stores 8 codes per 8w-bit word, word i holding dims 8i .. 8i+7, code j in bits
w*j .. w*j+w-1 (little-endian bytes: lowest code in the lowest bits). The kernel builds each word
as a shifted sum over the 8 codes of a row's (D/8, 8) view and stores whole words.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .device import num_sms

__all__ = ["encode_into", "encode_pair_into"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _store_plane(rowp, words, i, mask, OFF: tl.constexpr, WB: tl.constexpr, ALIGNED: tl.constexpr):
    """Store (BLOCK_R, W) words of WB bytes at byte offset OFF of each row (rowp: uint8 pointers)."""
    if ALIGNED:
        if WB == 4:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int32)) + i[None, :]
            tl.store(p, words.to(tl.int32), mask=mask)
        elif WB == 2:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int16)) + i[None, :]
            tl.store(p, words.to(tl.int16), mask=mask)
        elif WB == 1:
            p = rowp[:, None] + OFF + i[None, :]
            tl.store(p, words.to(tl.uint8), mask=mask)
        else:
            p = (rowp[:, None] + OFF).to(tl.pointer_type(tl.int64)) + i[None, :]
            tl.store(p, words.to(tl.int64), mask=mask)
    else:
        base = rowp[:, None] + OFF + i[None, :] * WB
        for j in tl.static_range(WB):
            tl.store(base + j, ((words >> (8 * j)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _pack_plane(code, SHIFT: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
                DP: tl.constexpr, PERM: tl.constexpr):
    """Bits SHIFT .. SHIFT+WIDTH-1 of each code, 8 codes per word: (BLOCK_R, DP // 8) words.

    code: (BLOCK_R, DP) in natural dim order, or slice-major (column s * DP/8 + i = dim 8i + s)
    when PERM.
    """
    part = (code >> SHIFT) & ((1 << WIDTH) - 1)
    if WIDTH == 8:
        part = part.to(tl.int64)
    sh = (tl.arange(0, 8) * WIDTH).to(part.dtype)
    if PERM:
        g = tl.reshape(part, (BLOCK_R, 8, DP // 8))
        words = tl.sum(g << sh[None, :, None], axis=1)
    else:
        g = tl.reshape(part, (BLOCK_R, DP // 8, 8))
        words = tl.sum(g << sh[None, None, :], axis=2)
    return words


@triton.jit
def _mm(a, b, acc, HAS_ACC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b (+ acc) with bf16 operands and fp32 accumulation. The interpreter multiplies bf16 by
    their raw bits, so there the (exactly representable) operands go in as fp32."""
    if INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if HAS_ACC:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def _split3(rt):
    """fp32 matrix -> three bf16 pieces whose sum keeps float32's 24 significant bits."""
    r1 = rt.to(tl.bfloat16)
    rem = rt - r1.to(tl.float32)
    r2 = rem.to(tl.bfloat16)
    r3 = (rem - r2.to(tl.float32)).to(tl.bfloat16)
    return r1, r2, r3


@triton.jit
def _rotate(xf, x1, r1, r2, r3, XP: tl.constexpr, INTERP: tl.constexpr):
    """x @ R (fp32 result) from bf16 pieces; terms x_i @ R_j with i + j <= 2, smallest first. Each
    bf16 x bf16 product is exact and the sums are fp32."""
    if XP == 1:
        acc = _mm(x1, r3, 0.0, False, INTERP)
        acc = _mm(x1, r2, acc, True, INTERP)
    else:
        xr = xf - x1.to(tl.float32)
        x2 = xr.to(tl.bfloat16)
        if XP == 3:
            x3 = (xr - x2.to(tl.float32)).to(tl.bfloat16)
            acc = _mm(x3, r1, 0.0, False, INTERP)
            acc = _mm(x1, r3, acc, True, INTERP)
        else:
            acc = _mm(x1, r3, 0.0, False, INTERP)
        acc = _mm(x2, r2, acc, True, INTERP)
        acc = _mm(x2, r1, acc, True, INTERP)
        acc = _mm(x1, r2, acc, True, INTERP)
    return _mm(x1, r1, acc, True, INTERP)


@triton.jit
def _bucketize(acc, nz, BND, BITS: tl.constexpr, SYM: tl.constexpr):
    """code = #{boundaries < acc / nz} for (BLOCK_R, C) acc and (BLOCK_R,) nz = max(|x|, 1e-30)."""
    if SYM:
        # Symmetric codebook (b[H-1+i] = -b[H-1-i], b[H-1] = 0): find the magnitude index k =
        # #{positive boundaries below |y|} by a select tree, comparing |acc| with the per-row
        # thresholds b * |x| (no per-element division). For y <= 0 the count must include ties
        # (code = #{b < y}): comparing the next float above |acc| does that.
        H: tl.constexpr = 1 << (BITS - 1)
        pos = acc > 0.0
        a = tl.abs(acc)
        a = tl.where(pos, a, (a.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True))
        if BITS == 2:
            k = (a > (tl.load(BND + 2) * nz)[:, None]).to(tl.int32)
        elif BITS == 3:
            t0 = (tl.load(BND + 4) * nz)[:, None]
            t1 = (tl.load(BND + 5) * nz)[:, None]
            t2 = (tl.load(BND + 6) * nz)[:, None]
            g1 = a > t1
            g2 = a > tl.where(g1, t2, t0)
            k = tl.where(g1, 2, 0) + tl.where(g2, 1, 0)
        else:
            t0 = (tl.load(BND + 8) * nz)[:, None]
            t1 = (tl.load(BND + 9) * nz)[:, None]
            t2 = (tl.load(BND + 10) * nz)[:, None]
            t3 = (tl.load(BND + 11) * nz)[:, None]
            t4 = (tl.load(BND + 12) * nz)[:, None]
            t5 = (tl.load(BND + 13) * nz)[:, None]
            t6 = (tl.load(BND + 14) * nz)[:, None]
            g1 = a > t3
            g2 = a > tl.where(g1, t5, t1)
            g3 = a > tl.where(g1, tl.where(g2, t6, t4), tl.where(g2, t2, t0))
            k = tl.where(g1, 4, 0) + tl.where(g2, 2, 0) + tl.where(g3, 1, 0)
        code = tl.where(pos, H + k, H - 1 - k)
    else:
        y = acc / nz[:, None]
        # Binary search over the sorted boundaries (a tiny table, served from L1).
        code = tl.zeros(acc.shape, tl.int32)
        for lvl in tl.static_range(BITS):
            t = tl.load(BND + code + ((1 << (BITS - 1 - lvl)) - 1))
            code = tl.where(y > t, code + (1 << (BITS - 1 - lvl)), code)
    return code


@triton.jit
def _store_codes(rowp, code, word0, wmask, BITS: tl.constexpr, WREAL: tl.constexpr,
                 BLOCK_R: tl.constexpr, C: tl.constexpr, PERM: tl.constexpr, ALIGNED: tl.constexpr):
    """Pack (BLOCK_R, C) codes (C/8 words per plane, starting at word index word0) and store them."""
    i = word0 + tl.arange(0, C // 8)
    if BITS == 8:
        _store_plane(rowp, _pack_plane(code, 0, 8, BLOCK_R, C, PERM), i, wmask, 0, 8, ALIGNED)
    else:
        SH2: tl.constexpr = BITS & 4
        SH1: tl.constexpr = (BITS & 4) + (BITS & 2)
        if BITS & 4:
            _store_plane(rowp, _pack_plane(code, 0, 4, BLOCK_R, C, PERM), i, wmask, 0, 4, ALIGNED)
        if BITS & 2:
            _store_plane(rowp, _pack_plane(code, SH2, 2, BLOCK_R, C, PERM), i, wmask,
                         SH2 * WREAL, 2, ALIGNED)
        if BITS & 1:
            _store_plane(rowp, _pack_plane(code, SH1, 1, BLOCK_R, C, PERM), i, wmask,
                         SH1 * WREAL, 1, ALIGNED)


@triton.jit
def _encode_rows(
    pid, X, s_xn, s_xd, RT, BND, CENT, CODES, s_cn, NORMS, s_nn,
    n_rows, n_iters, n_progs,
    D: tl.constexpr, DP: tl.constexpr, WREAL: tl.constexpr, BITS: tl.constexpr,
    NORM_CORR: tl.constexpr, XP: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr,
    ITERS_CT: tl.constexpr, INTERP: tl.constexpr, PERM: tl.constexpr, SYM: tl.constexpr,
    CH: tl.constexpr, FMA: tl.constexpr,
):
    """Program ``pid``'s rows (pid + it * n_progs) * BLOCK_R ... of x; output columns in NCH = DP / CH
    chunks (one chunk up to D = 128: R stays on chip for the whole persistent program; wider heads
    reload column chunks of R per row block, which keeps shared memory within the limit). ``FMA``: the
    rotation as float32 products and sums instead of tensor-core pieces (a few rows per program, one
    chunk: a decode step's tokens, where the latency of the tensor-core path's set-up dominates)."""
    NCH: tl.constexpr = DP // CH
    d = tl.arange(0, DP)
    dmask = d < D
    j = tl.arange(0, CH)
    if NCH == 1:
        if PERM:
            # Output column j = s * (D/8) + i holds dim 8i + s ("slice-major"): the 8 codes of a
            # packed word then sit in one thread of the matmul's accumulator layout, and packing
            # is a thread-local shifted sum.
            col = (j % (CH // 8)) * 8 + j // (CH // 8)
        else:
            col = j
        rt = tl.load(RT + d[:, None] * D + col[None, :], mask=dmask[:, None] & (col < D)[None, :], other=0.0)
        if not FMA:
            r1, r2, r3 = _split3(rt)
    for it in range(0, ITERS_CT if ITERS_CT > 0 else n_iters):
        rows = (pid + it * n_progs) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * s_xn + d[None, :] * s_xd, mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        rowp = CODES + rows64 * s_cn
        csq = tl.zeros([BLOCK_R], tl.float32)
        if NCH == 1 and XP == 1:
            # bf16 input, one chunk: the loaded tile is the only use of x (so its load pipelines
            # into shared memory) and |x| comes from the rotated vector: R is orthogonal, so
            # |x @ R.T| = |x| up to float32 rounding (<= 1 fp16 ulp on the stored norm).
            if FMA:
                acc = tl.sum(x.to(tl.float32)[:, :, None] * rt[None, :, :], axis=1)
            else:
                acc = _rotate(x, x, r1, r2, r3, XP, INTERP)
            norm = tl.sqrt(tl.sum(acc * acc, axis=1))
            nz = tl.maximum(norm, 1e-30)  # y = acc / nz, as in the reference
            code = tl.where((j < D)[None, :], _bucketize(acc, nz, BND, BITS, SYM), 0)
            if NORM_CORR:
                c = tl.load(CENT + code)
                csq = tl.sum(tl.where((j < D)[None, :], c * c, 0.0), axis=1)
            wmask = rmask[:, None] & (tl.arange(0, CH // 8) < WREAL)[None, :]
            _store_codes(rowp, code, 0, wmask, BITS, WREAL, BLOCK_R, CH, PERM, ALIGNED)
        else:
            xf = x.to(tl.float32)
            norm = tl.sqrt(tl.sum(xf * xf, axis=1))
            nz = tl.maximum(norm, 1e-30)  # y = acc / nz, as in the reference
            x1 = xf.to(tl.bfloat16)
            # A runtime loop over column chunks: one chunk's R pieces in shared memory at a time.
            for ch in range(0, NCH):
                if NCH == 1 and FMA:
                    acc = tl.sum(xf[:, :, None] * rt[None, :, :], axis=1)
                elif NCH == 1:
                    acc = _rotate(xf, x1, r1, r2, r3, XP, INTERP)
                else:
                    cc = ch * CH + j
                    q1, q2, q3 = _split3(tl.load(RT + d[:, None] * D + cc[None, :],
                                                 mask=dmask[:, None] & (cc < D)[None, :], other=0.0))
                    acc = _rotate(xf, x1, q1, q2, q3, XP, INTERP)
                dvalid = (ch * CH + j) < D
                code = tl.where(dvalid[None, :], _bucketize(acc, nz, BND, BITS, SYM), 0)
                if NORM_CORR:
                    c = tl.load(CENT + code)
                    csq += tl.sum(tl.where(dvalid[None, :], c * c, 0.0), axis=1)
                w0 = ch * (CH // 8)
                wmask = rmask[:, None] & ((w0 + tl.arange(0, CH // 8)) < WREAL)[None, :]
                _store_codes(rowp, code, w0, wmask, BITS, WREAL, BLOCK_R, CH, PERM, ALIGNED)
        stored = norm
        if NORM_CORR:
            stored = norm / tl.sqrt(csq)
        tl.store(NORMS + rows64 * s_nn, stored.to(tl.float16), mask=rmask)




@triton.jit
def _encode_kernel(
    X, s_xn, s_xd, RT, BND, CENT, CODES, s_cn, NORMS, s_nn,
    n_rows, n_iters, n_progs,
    D: tl.constexpr, DP: tl.constexpr, WREAL: tl.constexpr, BITS: tl.constexpr,
    NORM_CORR: tl.constexpr, XP: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr,
    ITERS_CT: tl.constexpr, INTERP: tl.constexpr, PERM: tl.constexpr, SYM: tl.constexpr,
    CH: tl.constexpr, FMA: tl.constexpr,
):
    _encode_rows(tl.program_id(0), X, s_xn, s_xd, RT, BND, CENT, CODES, s_cn, NORMS, s_nn, n_rows, n_iters, n_progs,
                 D, DP, WREAL, BITS, NORM_CORR, XP, BLOCK_R, ALIGNED, ITERS_CT, INTERP, PERM, SYM, CH, FMA)


@triton.jit
def _encode_pair_kernel(
    XK, s_kxn, s_kxd, RTK, BNDK, CENTK, CODESK, s_kcn, NORMSK, s_knn,
    XV, s_vxn, s_vxd, RTV, BNDV, CENTV, CODESV, s_vcn, NORMSV, s_vnn,
    n_rows, n_iters, n_progs,
    CLOCK, ring_w, out_base, s_kxs, s_kcs, s_kns, s_vxs, s_vcs, s_vns,
    D: tl.constexpr, DP: tl.constexpr, WREAL: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
    NORM_CORR: tl.constexpr, XP: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED_K: tl.constexpr,
    ALIGNED_V: tl.constexpr, ITERS_CT: tl.constexpr, INTERP: tl.constexpr, PERM: tl.constexpr,
    SYM_K: tl.constexpr, SYM_V: tl.constexpr, CH: tl.constexpr, AT: tl.constexpr, FMA: tl.constexpr,
):
    """Keys (program_id(1) = 0) and values (1) of the same rows in one launch: a decode step's token
    leaving the window, both kinds with their own bits, rotation and codebook. With ``AT`` the
    token is read from a ring slot and written at a history position both taken from the device
    clock ``t`` (slot ``t % ring_w``, position ``out_base + t``; ``s_*s``: each buffer's token stride)."""
    if AT:
        t = tl.load(CLOCK)
        slot = t % ring_w
        o = out_base + t
        XK = XK + slot * s_kxs
        XV = XV + slot * s_vxs
        CODESK = CODESK + o * s_kcs
        CODESV = CODESV + o * s_vcs
        NORMSK = NORMSK + o * s_kns
        NORMSV = NORMSV + o * s_vns
    if tl.program_id(1) == 0:
        _encode_rows(tl.program_id(0), XK, s_kxn, s_kxd, RTK, BNDK, CENTK, CODESK, s_kcn, NORMSK, s_knn,
                     n_rows, n_iters, n_progs, D, DP, WREAL, BITS_K, NORM_CORR, XP, BLOCK_R, ALIGNED_K,
                     ITERS_CT, INTERP, PERM, SYM_K, CH, FMA)
    else:
        _encode_rows(tl.program_id(0), XV, s_vxn, s_vxd, RTV, BNDV, CENTV, CODESV, s_vcn, NORMSV, s_vnn,
                     n_rows, n_iters, n_progs, D, DP, WREAL, BITS_V, NORM_CORR, XP, BLOCK_R, ALIGNED_V,
                     ITERS_CT, INTERP, PERM, SYM_V, CH, FMA)


def symmetric(boundaries, centroids, bits: int) -> bool:
    """Whether the codebook is exactly symmetric (b[H-1] = 0, b[H-1+i] = -b[H-1-i], c[H+i] = -c[H-1-i]);
    then 4-bit bucketize compares |y| with 7 boundaries instead of searching 15; bits > 4 never use
    it. Device tensors are copied to the host (one sync): callers that encode repeatedly compute it
    once and pass it to ``encode_into``."""
    if bits > 4 or bits < 2:
        return False
    b, c = (torch.as_tensor(np.array(x) if isinstance(x, np.ndarray) else x).detach().cpu()
            for x in (boundaries, centroids))
    return bool(torch.equal(b, -b.flip(0)) and torch.equal(c, -c.flip(0)) and b[len(b) // 2] == 0)


def _num_sms(device: torch.device) -> int:
    return num_sms(device, cpu=4)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def encode_into(x, rot_t, boundaries, centroids, *, bits: int, norm_correction: bool,
                codes_out, norms_out, block_rows: int | None = None, num_warps: int | None = None,
                programs: int | None = None, num_stages: int | None = None, is_symmetric: bool | None = None,
                fma: bool | None = None):
    """Encode rows of ``x`` into preallocated code and norm buffers.

    Args:
        x: (N, D) bf16 / fp16 / fp32.
        rot_t: (D, D) float32, R.T (``rotation.haar(D, seed).T``), contiguous.
        boundaries: (2**bits - 1,) float32 sorted; centroids: (2**bits,) float32.
        bits: 1..8. norm_correction: store |x| / |c[code]| instead of |x|.
        codes_out: (N, ceil(D/8) * bits) uint8, last axis contiguous (a view into a cache is fine).
        is_symmetric: ``symmetric(boundaries, centroids, bits)`` when the caller keeps it (else it
            is computed, one host copy).
        norms_out: (N,) float16 (any stride).
        block_rows, num_warps, programs, num_stages: tuning knobs.
        fma: the rotation as float32 FMAs, one row per program (default: for up to FMA_ROWS rows at
            head_dim <= 128) instead of tensor-core products of bf16 pieces; the same codes up to
            float32-rounding-level flips next to a boundary.

    Writes codes_out and norms_out with the same meaning as ``TurboQuantizer.encode(x)`` (codes
    equal up to float32-rounding-level flips next to a boundary). Returns (codes_out, norms_out).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    N, D = x.shape
    wreal = -(-D // 8)
    if tuple(rot_t.shape) != (D, D) or rot_t.dtype != torch.float32:
        raise ValueError(f"rot_t must be a ({D}, {D}) float32 tensor, got {rot_t.dtype} {tuple(rot_t.shape)}")
    if boundaries.numel() != 2 ** bits - 1 or boundaries.dtype != torch.float32:
        raise ValueError(f"boundaries must be ({2 ** bits - 1},) float32")
    if centroids.numel() != 2 ** bits or centroids.dtype != torch.float32:
        raise ValueError(f"centroids must be ({2 ** bits},) float32")
    if codes_out.dtype != torch.uint8 or tuple(codes_out.shape) != (N, wreal * bits):
        raise ValueError(f"codes_out must be a ({N}, {wreal * bits}) uint8 tensor, got "
                         f"{codes_out.dtype} {tuple(codes_out.shape)}")
    if N and codes_out.stride(1) != 1:
        raise ValueError("codes_out must be contiguous along its last axis")
    if norms_out.dtype != torch.float16 or tuple(norms_out.shape) != (N,):
        raise ValueError(f"norms_out must be a ({N},) float16 tensor")
    for name, t in (("rot_t", rot_t), ("boundaries", boundaries), ("centroids", centroids),
                    ("codes_out", codes_out), ("norms_out", norms_out)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if N == 0:
        return codes_out, norms_out
    rot_t = rot_t.contiguous()
    boundaries = boundaries.contiguous()
    centroids = centroids.contiguous()
    plan = _plan(x, N, D, block_rows, num_warps, programs, num_stages, fma)
    sym = symmetric(boundaries, centroids, bits) if is_symmetric is None else is_symmetric
    _encode_kernel[(plan["programs"],)](
        x, x.stride(0), x.stride(1), rot_t, boundaries, centroids,
        codes_out, codes_out.stride(0), norms_out, norms_out.stride(0),
        N, plan["n_iters"], plan["programs"],
        BITS=bits, NORM_CORR=bool(norm_correction), ALIGNED=_aligned(codes_out, bits, N), SYM=sym,
        **plan["constexprs"], **plan["launch"],
    )
    return codes_out, norms_out


FMA_ROWS = 64  # up to this many rows (a decode step's tokens: batch x KV heads) the rotation is float32 FMAs


def _plan(x, N: int, D: int, block_rows=None, num_warps=None, programs=None, num_stages=None, fma=None) -> dict:
    """Launch shape of an encode of N rows of x (N, D): program count, iterations, constexprs."""
    interp = _interpreting()
    DP = max(16, _next_pow2(D))
    xp = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}[x.dtype]  # bf16 pieces x needs
    if fma is None:
        fma = N <= FMA_ROWS and DP <= 128
    elif fma and DP > 128:
        raise ValueError(f"fma=True takes head_dim <= 128, got {D}")
    if fma:
        # One row per program, its rotation as float32 products summed per output column: a few
        # microseconds of latency where the tensor-core path spends ~15 on its set-up for 8 rows.
        return {"programs": N, "n_iters": 1,
                "constexprs": dict(D=D, DP=DP, WREAL=-(-D // 8), XP=xp, BLOCK_R=1, ITERS_CT=1 if interp else 0,
                                   INTERP=interp, PERM=False, CH=DP, FMA=True),  # R's columns in order: coalesced
                "launch": {} if interp else {"num_warps": num_warps or 8, "num_stages": 1}}
    small = N <= 128 and DP <= 128
    if block_rows is None:
        # A few rows beyond FMA_ROWS (a large batch's decode step): 16-row blocks of 4 warps (measured
        # on the H200, 64 rows of D = 128: 16 us vs 21 us with 128-row blocks of 8 warps).
        block_rows = 16 if small else 128 if DP <= 128 else 64
    if num_warps is None:
        num_warps = 4 if small else 8
    if num_stages is None and DP > 128:
        num_stages = 1  # R's column chunks and the x tile fill shared memory already
    elif num_stages is None and x.dtype != torch.bfloat16:
        num_stages = 2  # fp32 / fp16 staging of a 128-row tile: 3 stages exceed shared memory
    n_blocks = -(-N // block_rows)
    if programs is None:
        # A block fills an SM's shared memory at D >= 128 (R's pieces + staged x): one per SM
        # (measured on the H200: 802 us vs 830 us with two per SM queued, 2 M rows, 4 bits).
        programs = _num_sms(x.device) * (1 if DP >= 128 else 2)
    programs = max(1, min(programs, n_blocks))
    n_iters = -(-n_blocks // programs)
    return {"programs": programs, "n_iters": n_iters,
            "constexprs": dict(D=D, DP=DP, WREAL=-(-D // 8), XP=xp, BLOCK_R=block_rows,
                               ITERS_CT=n_iters if interp else 0, INTERP=interp,
                               PERM=DP == D and D % 8 == 0 and DP <= 128, CH=DP if DP <= 128 else 64, FMA=False),
            "launch": {} if interp else {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}}


def _aligned(codes_out, bits: int, N: int) -> bool:
    wb = 8 if bits == 8 else max(w for w in (4, 2, 1) if bits & w)
    return codes_out.data_ptr() % wb == 0 and (codes_out.stride(0) % wb == 0 or N == 1)


def encode_pair_into(xk, xv, k, v, *, norm_correction: bool, at: dict | None = None):
    """Keys and values of the same N rows, encoded in one launch into their buffers.

    Args:
        xk, xv: (N, D) of one dtype (bf16 / fp16 / fp32), any row stride.
        k, v: per kind a dict with ``rot_t`` (D, D) float32 contiguous, ``boundaries``, ``centroids``
            (float32 contiguous), ``bits``, ``symmetric`` (``symmetric(...)`` of its codebook),
            ``codes`` (N, ceil(D/8) * bits) uint8 (last axis contiguous) and ``norms`` (N,) float16:
            what ``encode_into`` takes and checks, here checked for shape and device only (the caller,
            a cache's store, made them).
        at: with a device clock (``graph_step``): {"clock": (1,) int64 tensor t, "ring": slots W,
            "base": int, "strides": (token strides of xk, k codes, k norms, xv, v codes, v norms)};
            row i is then read at slot t % W of xk/xv and written at position base + t (the row
            views given are those of slot 0 and position 0).
    Same codes and norms as two ``encode_into`` calls.
    """
    N, D = xk.shape
    if tuple(xv.shape) != (N, D) or xv.dtype != xk.dtype or xv.device != xk.device:
        raise ValueError(f"xk and xv must be ({N}, {D}) of one dtype and device, got {tuple(xv.shape)} {xv.dtype}")
    for name, kind in (("k", k), ("v", v)):
        if tuple(kind["codes"].shape) != (N, -(-D // 8) * kind["bits"]) or tuple(kind["norms"].shape) != (N,):
            raise ValueError(f"{name}: codes must be ({N}, {-(-D // 8) * kind['bits']}) and norms ({N},), got "
                             f"{tuple(kind['codes'].shape)} and {tuple(kind['norms'].shape)}")
    if N == 0:
        return
    plan = _plan(xk, N, D)
    _encode_pair_kernel[(plan["programs"], 2)](
        xk, xk.stride(0), xk.stride(1), k["rot_t"], k["boundaries"], k["centroids"],
        k["codes"], k["codes"].stride(0), k["norms"], k["norms"].stride(0),
        xv, xv.stride(0), xv.stride(1), v["rot_t"], v["boundaries"], v["centroids"],
        v["codes"], v["codes"].stride(0), v["norms"], v["norms"].stride(0),
        N, plan["n_iters"], plan["programs"],
        *((at["clock"], at["ring"], at["base"], *at["strides"]) if at else (xk, 1, 0, 0, 0, 0, 0, 0, 0)),
        BITS_K=k["bits"], BITS_V=v["bits"], NORM_CORR=bool(norm_correction),
        ALIGNED_K=_aligned(k["codes"], k["bits"], N), ALIGNED_V=_aligned(v["codes"], v["bits"], N),
        SYM_K=k["symmetric"], SYM_V=v["symmetric"], AT=bool(at), **plan["constexprs"], **plan["launch"],
    )
