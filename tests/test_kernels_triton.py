"""Parity of the Triton kernels (tq_core/kernels/triton) with the codec they read and write.

attend_codes is checked against float64 attention over the SAME stored codes (unpacked with
packing.unpack, centroids in the rotated space; one case also decodes fully with
TurboQuantizer.decode and attends in the original space). encode_into is checked against
TurboQuantizer(dim, bits, seed).encode on the same x: codes equal except float32-rounding-level
flips next to a boundary, norms within one fp16 ulp. Outputs are poisoned before every run and
inputs are fresh random draws per case.

Without a CUDA device the kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set
before the kernel modules are imported) at small sizes; with one they run natively, plus larger
sizes and the byte-permute lookup path. No test here asserts speed: bench/kernels_h200.py and
docs/kernels.md hold the timings.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
import zlib

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed: pip install triton", allow_module_level=True)

CUDA = torch.cuda.is_available()
if not CUDA:
    # The interpreter must be on before triton is imported: triton.language's own helpers
    # (tl.zeros, ...) are decorated at import time.
    os.environ["TRITON_INTERPRET"] = "1"
import triton.language as tl  # noqa: E402

if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.skip("no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be set: "
                    "run this file on its own or export TRITON_INTERPRET=1", allow_module_level=True)
    for _name in ("tq_core.kernels.triton.decode_attention", "tq_core.kernels.triton.decode_step",
                  "tq_core.kernels.triton.encode"):
        if _name in sys.modules:  # decorated before the interpreter was on
            importlib.reload(sys.modules[_name])

from tq_core import codebook, packing, rotation  # noqa: E402
from tq_core.kernels.triton import decode_attention as da  # noqa: E402
from tq_core.kernels.triton import encode as enc  # noqa: E402
from tq_core.quantizer import TurboQuantizer  # noqa: E402

import kernel_parity as kp  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
K_SEED, V_SEED = 101, 202


# ----------------------------------------------------------------------------- helpers


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _codebook_tensors(dim: int, bits: int):
    cb = codebook.load(dim, bits)
    return (torch.tensor(cb.centroids, dtype=torch.float32, device=DEV),
            torch.tensor(cb.boundaries.astype(np.float32), device=DEV))


def _stored(B, Hkv, cap, D, bits, seed, gen, strided):
    """Encoded random history in cache-shaped (B, Hkv, cap, bytes) buffers (strided views if asked)."""
    q = TurboQuantizer(D, bits, seed)
    x = torch.randn(B, Hkv, cap, D, generator=gen) * (0.5 + torch.rand(B, Hkv, cap, 1, generator=gen) * 3)
    e = q.encode(x, check=False)
    codes, norms = e.codes, e.norms
    if strided:
        # A view into a larger buffer: extra heads, every other token, padded rows.
        big = torch.randint(0, 256, (B, Hkv + 1, 2 * cap, codes.shape[-1] + 8), generator=gen, dtype=torch.uint8)
        big[:, 1:, ::2, 3:3 + codes.shape[-1]] = codes
        codes = big[:, 1:, ::2, 3:3 + codes.shape[-1]]
        bign = torch.randn(B, 2 * cap, Hkv, generator=gen).to(torch.float16)
        bign[:, ::2, :] = norms.transpose(1, 2)
        norms = bign[:, ::2, :].transpose(1, 2)
    return q, codes.to(DEV), norms.to(DEV)


def _reference(qrot, qk, kc, kn, qv, vc, vn, length, scale):
    """float64 attention in the rotated space from the stored codes: (o_rot, lse) on the CPU."""
    D = qk.dim
    B, Hq, Tq, _ = qrot.shape
    Hkv = kc.shape[1]
    if length == 0:
        return torch.zeros(B, Hq, Tq, D, dtype=torch.float64), torch.full((B, Hq, Tq), -math.inf, dtype=torch.float64)
    ck = torch.tensor(qk.codebook.centroids, dtype=torch.float64)
    cv = torch.tensor(qv.codebook.centroids, dtype=torch.float64)
    kcode = packing.unpack(kc[:, :, :length].cpu().contiguous(), qk.bits, D).long()
    vcode = packing.unpack(vc[:, :, :length].cpu().contiguous(), qv.bits, D).long()
    k = ck[kcode] * kn[:, :, :length].cpu().double()[..., None]
    v = cv[vcode] * vn[:, :, :length].cpu().double()[..., None]
    G = Hq // Hkv
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = scale * qrot.cpu().double() @ k.transpose(-1, -2)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _run_attend(case, gen, lut=None, check_decode=False):
    B, Hkv, G, Tq, D = case["B"], case["Hkv"], case["G"], case["Tq"], case["D"]
    bk, bv, length, cap = case["bk"], case["bv"], case["len"], case["cap"]
    strided = case.get("strided", False)
    qk, kc, kn = _stored(B, Hkv, cap, D, bk, K_SEED, gen, strided)
    qv, vc, vn = _stored(B, Hkv, cap, D, bv, V_SEED, gen, strided)
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen) * 0.3
    rk = torch.tensor(rotation.haar(D, K_SEED), dtype=torch.float32)
    qdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["q"]]
    qrot = (q @ rk.T).to(qdt).to(DEV)
    scale = 1.0 / math.sqrt(D)
    ck, _ = _codebook_tensors(D, bk)
    cv, _ = _codebook_tensors(D, bv)
    o = torch.full((B, Hkv * G, Tq, D), math.nan, device=DEV)
    lse = torch.full((B, Hkv * G, Tq), math.nan, device=DEV)
    da.attend_codes(qrot, kc, kn, vc, vn, ck, cv, bits_k=bk, bits_v=bv, length=length, scale=scale,
                    lut=lut, out=(o, lse))
    ro, rl = _reference(qrot, qk, kc, kn, qv, vc, vn, length, scale)
    o, lse = o.cpu().double(), lse.cpu().double()
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten (poisoned) outputs"
    if length == 0:
        assert torch.equal(o, torch.zeros_like(o)) and bool((lse == -math.inf).all())
        return
    err = ((o - ro).norm() / ro.norm()).item()
    lse_err = (lse - rl).abs().max().item()
    # fp32 queries: fp32 operands (tf32x3 / exact in the interpreter); 16-bit queries: fp16
    # operands (centroids and probabilities rounded to 2^-11), fp32 accumulation.
    tol, lse_tol = (2e-5, 1e-4) if qdt == torch.float32 else (1e-2, 2e-3)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    assert lse_err < lse_tol, f"lse error {lse_err:.3g} >= {lse_tol}"
    if check_decode:
        # Fully decoded K/V in the original space: out = o_rot @ R_v equals softmax(q k_hat^T) v_hat.
        rv = torch.tensor(rotation.haar(D, V_SEED), dtype=torch.float64)
        kh = qk.decode(_enc(qk, kc[:, :, :length], kn[:, :, :length]), dtype=torch.float64)
        vh = qv.decode(_enc(qv, vc[:, :, :length], vn[:, :, :length]), dtype=torch.float64)
        kh, vh = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1)
        qo = qrot.cpu().double() @ rk.double()  # back to the original space
        ref = torch.softmax(scale * qo @ kh.transpose(-1, -2), -1) @ vh
        err2 = ((o @ rv - ref).norm() / ref.norm()).item()
        assert err2 < max(tol, 1e-5), f"original-space relative error {err2:.3g}"


def _enc(q, codes, norms):
    from tq_core.quantizer import Encoded

    return Encoded(codes.cpu().contiguous(), norms.cpu().contiguous(), q.dim, q.bits, torch.float32, q.seed)


# ----------------------------------------------------------------------------- attend_codes

ATTEND_CASES = [  # easy -> hard; every length odd or not a multiple of any block
    dict(B=1, Hkv=1, G=1, Tq=1, D=64, bk=4, bv=2, len=1, cap=3, q="fp32"),
    dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=17, cap=40, q="fp32"),
    dict(B=1, Hkv=1, G=1, Tq=3, D=64, bk=3, bv=4, len=33, cap=50, q="fp32", strided=True),
    dict(B=1, Hkv=2, G=8, Tq=2, D=128, bk=2, bv=3, len=200, cap=203, q="fp32"),
    dict(B=2, Hkv=1, G=4, Tq=1, D=64, bk=5, bv=1, len=45, cap=45, q="fp32"),
    dict(B=1, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=77, cap=90, q="bf16", strided=True),
    dict(B=1, Hkv=1, G=2, Tq=1, D=96, bk=8, bv=2, len=9, cap=12, q="fp16"),
    dict(B=1, Hkv=1, G=4, Tq=1, D=128, bk=4, bv=2, len=0, cap=8, q="bf16"),
]
if CUDA:
    ATTEND_CASES += [
        dict(B=3, Hkv=8, G=4, Tq=1, D=128, bk=4, bv=2, len=1000, cap=1100, q="bf16", strided=True),
        dict(B=2, Hkv=2, G=8, Tq=4, D=128, bk=3, bv=3, len=4097, cap=5000, q="bf16"),
        dict(B=1, Hkv=4, G=4, Tq=16, D=64, bk=2, bv=4, len=2049, cap=2049, q="fp16"),
        dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=3001, cap=3001, q="fp32", strided=True),
        dict(B=1, Hkv=8, G=4, Tq=1, D=128, bk=4, bv=2, len=33000, cap=33000, q="bf16"),
    ]


@pytest.mark.parametrize("case", ATTEND_CASES, ids=_case_id)
def test_attend_codes_matches_float64_reference(case):
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    _run_attend(case, gen, check_decode=case["len"] in (17, 33))


@pytest.mark.skipif(not CUDA, reason="the byte-permute lookup needs CUDA (no inline PTX in the interpreter)")
@pytest.mark.parametrize("bits", [(4, 2), (3, 1), (2, 4), (1, 3)], ids=lambda b: f"K{b[0]}V{b[1]}")
def test_attend_codes_lut_paths_agree(bits):
    case = dict(B=2, Hkv=2, G=4, Tq=2, D=128, bk=bits[0], bv=bits[1], len=301, cap=320, q="bf16")
    for lut in ("asm", "load"):
        _run_attend(case, torch.Generator().manual_seed(7), lut=lut)


def test_attend_codes_rejects_bad_shapes():
    D, bits = 64, 4
    kc = torch.zeros(1, 2, 8, packing.packed_size(D, bits), dtype=torch.uint8, device=DEV)
    kn = torch.zeros(1, 2, 8, dtype=torch.float16, device=DEV)
    c = torch.zeros(16, device=DEV)
    q = torch.zeros(1, 3, 1, D, device=DEV)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="multiple"):
        da.attend_codes(q, kc, kn, kc, kn, c, c, bits_k=4, bits_v=4, length=8, scale=1.0)
    q = torch.zeros(1, 2, 1, D, device=DEV)
    with pytest.raises(ValueError, match="length"):
        da.attend_codes(q, kc, kn, kc, kn, c, c, bits_k=4, bits_v=4, length=9, scale=1.0)


# ----------------------------------------------------------------------------- lookup logic


def _prmt(a, b, c):
    shape = np.broadcast(a, b, c).shape
    src = np.broadcast_to(np.asarray(a, np.uint64) | (np.asarray(b, np.uint64) << np.uint64(32)), shape)
    c = np.broadcast_to(np.asarray(c, np.uint64), shape)
    out = np.zeros(src.shape, np.uint64)
    for k in range(4):
        sel = (c >> np.uint64(4 * k)) & np.uint64(0xF)
        byte = (src >> ((sel & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = np.where(byte >> np.uint64(7), np.uint64(0xFF), np.uint64(0))
        out |= np.where(sel & np.uint64(8), sign, byte) << np.uint64(8 * k)
    return out.astype(np.uint32)


def _run_ptx(text, regs):
    """Execute the integer PTX subset of the lookup kernels on numpy uint32 arrays."""
    env = {}

    def val(tok):
        if tok.startswith("$"):
            return np.asarray(regs[int(tok[1:])], np.uint32)
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return np.uint32(int(tok, 0))
        return env[tok]

    ops = {
        "prmt.b32": _prmt, "and.b32": np.bitwise_and, "or.b32": np.bitwise_or, "xor.b32": np.bitwise_xor,
        "not.b32": np.invert, "shr.b32": lambda a, s: a >> s,
        "shl.b32": lambda a, s: (a.astype(np.uint64) << np.uint64(s)).astype(np.uint32),
        "sub.u32": lambda a, b: (a.astype(np.int64) - b.astype(np.int64)).astype(np.uint32),
        "mad.lo.u32": lambda a, b, c: (a.astype(np.uint64) * np.uint64(b) + np.uint64(c)).astype(np.uint32),
    }
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [t.strip() for t in rest.split(",")]
        res = np.asarray(ops[op](*[val(t) for t in args])).astype(np.uint32)
        if dst.startswith("$"):
            regs[int(dst[1:])] = res
        else:
            env[dst] = res
    return regs


@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"bits={b}")
def test_byte_permute_lookup_logic(bits):
    """The inline-PTX lookups (run natively only on CUDA) give c[code] for every code: executed
    here instruction by instruction on random code words, against the fp16 table."""
    rng = np.random.default_rng(bits)
    c = torch.tensor(codebook.load(128, bits).centroids, dtype=torch.float32)
    t = [np.uint32(w & 0xFFFFFFFF) for w in da.byte_tables(c, bits)]
    c16 = c.to(torch.float16).numpy()
    a, b = rng.integers(0, 2 ** bits, size=(2, 4096, 8))
    if bits == 2:
        word = lambda x: sum(x[:, j].astype(np.uint32) << np.uint32(2 * j) for j in range(8))  # noqa: E731
        regs = {8: word(a) | (word(b) << np.uint32(16)), 9: t[0], 10: t[0], 11: t[2], 12: t[2]}
        text = da.ASM_TEXTS["lut2"]
    else:
        word = lambda x: sum(x[:, j].astype(np.uint32) << np.uint32(4 * j) for j in range(8))  # noqa: E731
        regs = {8: word(a), 9: word(b)}
        regs.update({10 + 2 * k + r: t[k] for k in range(4) for r in range(2)})
        text = da.ASM_TEXTS["lut16s" if bits == 4 else "lut8"]
    regs = _run_ptx(text, regs)
    for j in range(8):
        lo = (regs[j] & 0xFFFF).astype(np.uint16).view(np.float16)
        hi = (regs[j] >> 16).astype(np.uint16).view(np.float16)
        np.testing.assert_array_equal(lo, c16[a[:, j]])
        np.testing.assert_array_equal(hi, c16[b[:, j]])


def test_byte_tables_reject_asymmetric_4bit_codebook():
    c = torch.linspace(-1, 1.5, 16)
    with pytest.raises(ValueError, match="symmetric"):
        da.byte_tables(c, 4)


# ----------------------------------------------------------------------------- encode_into

ENCODE_CASES = [
    dict(N=5, D=64, bits=4, x="bf16", nc=True),
    dict(N=70, D=128, bits=4, x="bf16", nc=True, strided=True),
    dict(N=33, D=128, bits=2, x="bf16", nc=True),
    dict(N=41, D=64, bits=3, x="fp32", nc=True, strided=True),
    dict(N=17, D=128, bits=1, x="fp16", nc=False),
    dict(N=9, D=32, bits=8, x="fp32", nc=True),
    dict(N=23, D=96, bits=5, x="bf16", nc=True),
    # a decode step's rows take float32 FMAs by default (fma=None); both paths forced on small blocks
    dict(N=5, D=64, bits=4, x="bf16", nc=True, fma=False),
    dict(N=70, D=128, bits=2, x="fp16", nc=True, strided=True, fma=True),
]
if CUDA:
    ENCODE_CASES += [
        dict(N=100_003, D=128, bits=4, x="bf16", nc=True),
        dict(N=65_537, D=128, bits=2, x="bf16", nc=True, strided=True),
        dict(N=20_001, D=64, bits=3, x="fp16", nc=True),
        dict(N=20_001, D=128, bits=4, x="fp32", nc=False),
        dict(N=30_001, D=128, bits=4, x="fp32", nc=True),
        dict(N=4_001, D=256, bits=4, x="bf16", nc=True),
        dict(N=64, D=128, bits=4, x="bf16", nc=True, strided=True),
        dict(N=64, D=128, bits=4, x="bf16", nc=True, fma=False),
        dict(N=2_000, D=128, bits=4, x="fp32", nc=True, fma=True),
    ]


@pytest.mark.parametrize("case", ENCODE_CASES, ids=_case_id)
def test_encode_into_matches_quantizer(case):
    N, D, bits = case["N"], case["D"], case["bits"]
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    x = (torch.randn(N, D, generator=gen) * torch.exp(torch.randn(N, 1, generator=gen))).to(kp.DTYPES[case["x"]])
    q = TurboQuantizer(D, bits, seed=5, norm_correction=case["nc"])
    nb = packing.packed_size(D, bits)
    # a slot of a (N, 3, bytes + 4) cache buffer when strided, poisoned around it
    codes, norms, buffers = kp.poisoned_outputs(N, nb, case.get("strided", False), DEV)
    rot_t = torch.tensor(np.ascontiguousarray(rotation.haar(D, 5).T), dtype=torch.float32, device=DEV)
    c, b = _codebook_tensors(D, bits)
    enc.encode_into(x.to(DEV), rot_t, b, c, bits=bits, norm_correction=case["nc"], codes_out=codes, norms_out=norms,
                    fma=case.get("fma"))
    kp.check_untouched(nb, buffers)
    kp.check_encoded(q, x, codes, norms)


def test_encode_into_rejects_bad_buffers():
    x = torch.zeros(4, 64, device=DEV)
    rot_t = torch.eye(64, device=DEV)
    c, b = _codebook_tensors(64, 4)
    with pytest.raises(ValueError, match="codes_out"):
        enc.encode_into(x, rot_t, b, c, bits=4, norm_correction=True,
                        codes_out=torch.zeros(4, 31, dtype=torch.uint8, device=DEV),
                        norms_out=torch.zeros(4, dtype=torch.float16, device=DEV))


def test_nibble_spread_helpers():
    """_spread2 / _spread1 (the 2- and 1-bit planes as nibbles, feeding the 8-entry lookup)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kern(W2, W1, OUT2, OUT1):
        i = tl.arange(0, 64)
        tl.store(OUT2 + i, da._spread2(tl.load(W2 + i)))
        tl.store(OUT1 + i, da._spread1(tl.load(W1 + i)))

    rng = np.random.default_rng(0)
    w2 = rng.integers(0, 1 << 16, 64)
    w1 = rng.integers(0, 1 << 8, 64)
    o2 = torch.zeros(64, dtype=torch.int32, device=DEV)
    o1 = torch.zeros(64, dtype=torch.int32, device=DEV)
    kern[(1,)](torch.tensor(w2, dtype=torch.int32, device=DEV), torch.tensor(w1, dtype=torch.int32, device=DEV), o2, o1)
    want2 = sum(((w2 >> (2 * j)) & 3) << (4 * j) for j in range(8))
    want1 = sum(((w1 >> j) & 1) << (4 * j) for j in range(8))
    np.testing.assert_array_equal(o2.cpu().numpy().astype(np.int64) & 0xFFFFFFFF, want2)
    np.testing.assert_array_equal(o1.cpu().numpy().astype(np.int64) & 0xFFFFFFFF, want1)


# ----------------------------------------------------------------------------- the whole call

STEP_CASES = [
    # (config, dtype, B, Hkv, G, held, Tq, D): held tokens before the call, Tq new tokens (the queries)
    ("K4V2+s4w8", "fp32", 1, 2, 4, 40, 1, 64),
    ("K4V2+s4w8", "bf16", 2, 1, 3, 70, 1, 128),
    ("K3V4+s0w0", "fp32", 1, 2, 2, 33, 3, 64),     # no sinks, no window: history + own tokens
    ("K2V3+s2w16", "fp16", 1, 1, 4, 12, 2, 32),    # no history yet: full-precision tokens only
    ("K4V4+s4w4", "bf16", 1, 2, 8, 50, 2, 64),     # G * Tq = 16 rows
    ("K4V2+s4w8", "fp32", 1, 1, 2, 40, 1, 256),    # head_dim 256 (Gemma-3)
    ("K4V2+s4w8", "fp32", 1, 1, 4, 2200, 1, 64),   # > 16 history splits: the merge takes them in chunks
    ("K4V2+s4w8+c=1", "fp32", 1, 2, 4, 40, 1, 64),  # centered: own tokens centered, values' center added back
    ("K4V2+s4w8+c=1", "bf16", 2, 1, 3, 70, 2, 128),
]


@pytest.fixture
def triton_everywhere(monkeypatch):
    """The Triton kernels for every torch tensor (CPU ones run under the interpreter)."""
    if CUDA:
        return
    from tq_core.kernels import triton as triton_pkg
    from tq_core.ops import torch_ops

    monkeypatch.setattr(torch_ops, "attention_kernel", lambda like: triton_pkg)


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-B{c[2]}H{c[3]}G{c[4]}n{c[5]}t{c[6]}d{c[7]}")
def test_attention_step_matches_array_ops(case, triton_everywhere):
    """View.attend through the whole-call kernels equals the array-ops path over the same stored
    codes (and the decoded reference within the codes' own error), causal among the own tokens."""
    from tq_core import kernels

    dtype = kp.DTYPES[case[1]]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    whole_call, fast, err, err_ref = kp.attention_step_errors(case, gen, DEV)
    assert whole_call == (case[7] <= kernels.MAX_DIM)
    # fp32: fp32 products both ways; 16-bit: queries rotated to 16 bits and fp16 tensor-core operands
    # for the history, then one rounding of the output to the model's dtype.
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert err < tol, f"relative error vs array ops {err:.3g} >= {tol}"
    assert err_ref < tol + 1e-3 * (dtype != torch.float32) + 1e-6, f"relative error vs decoded reference {err_ref:.3g}"


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_span_store_attention_step_matches_array_ops(dt, triton_everywhere):
    """A sliding-window layer (span 40) after its history was dropped from and compacted: the
    whole-call kernels read the held codes (a view that starts past the buffers' first slot, then
    compacted ones) as the array-ops path does."""
    from tq_core.config import CacheConfig
    from tq_core.kvstore import LayerStore

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    B, Hkv, G, D = 1, 2, 4, 64
    gen = torch.Generator().manual_seed(7)
    store = LayerStore(CacheConfig.parse("K4V2+s4w8"), layer=3, head_dim=D, span=40)
    kv = lambda n: (torch.randn(B, Hkv, n, D, generator=gen) * 2).to(dtype).to(DEV)  # noqa: E731
    store.update(kv(50), kv(50))
    for steps in (3, 300):  # history dropped from its front; then compacted
        for _ in range(steps):
            store.update(kv(1), kv(1))
        assert store.held == 39 and store.encoded_tokens == 31
        q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(dtype).to(DEV)
        view = store.update(kv(1), kv(1))
        fast, ops_path = view.attend(q, D ** -0.5, kernel=True), view.attend(q, D ** -0.5, kernel=False)
        err = ((fast.double() - ops_path.double()).norm() / ops_path.double().norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1.5e-2), err
    from tq_core.kvstore import BLOCK

    # 304 tokens dropped in all, but the buffers were compacted (start moved back) and not grown
    assert store.hist_k.start < 304 and store.hist_k.capacity <= 31 + 1 + BLOCK


def test_attention_step_refuses_what_it_cannot_take():
    from tq_core.kernels.triton import decode_step as ds

    q = torch.zeros(1, 32, 1, 64, device=DEV)
    kv = torch.zeros(1, 1, 4, 64, device=DEV)
    with pytest.raises(ValueError, match="G \\* Tq <= 16"):
        ds.attend_step(q, 0.1, ((kv, kv), None, None))
    with pytest.raises(ValueError, match="nothing to attend"):
        ds.attend_step(q[:, :4], 0.1, (None, None, None))
    with pytest.raises(ValueError, match="dense tokens must be"):
        ds.attend_step(q[:, :4], 0.1, ((kv[..., :32], kv[..., :32]), None, None))


@pytest.mark.parametrize("batch,heads", [(1, 2), (2, 3)])
def test_store_encodes_spilled_tokens_in_place(batch, heads, monkeypatch):
    """A one-token decode step encodes the token leaving the window straight into the history
    buffers, keys and values in one launch (``kernels.encode_pair_into``): the held codes and norms
    are exactly what the fused encode gives for the same tokens, and decode step by step equals a
    prefill of the same tokens (whose many rows per head are encoded kind by kind and copied)."""
    from tq_core import kernels
    from tq_core.config import CacheConfig
    from tq_core.kernels import triton as triton_pkg
    from tq_core.kvstore import LayerStore
    from tq_core.ops import torch_ops

    if not CUDA:
        monkeypatch.setattr(torch_ops, "encode_kernel", lambda like: triton_pkg)
    used = []
    real = kernels.encode_pair_into
    monkeypatch.setattr(kernels, "encode_pair_into", lambda *a: used.append(real(*a)) or used[-1])
    gen = torch.Generator().manual_seed(7 + batch)
    cfg = CacheConfig.parse("K4V2+s2w4")
    tokens = (torch.randn(batch, heads, 12, 64, generator=gen) * 3).to(torch.bfloat16).to(DEV)
    stepped, prefilled = LayerStore(cfg, 1, 64), LayerStore(cfg, 1, 64)
    stepped.update(tokens[:, :, :6], tokens[:, :, :6])
    for t in range(6, 12):
        stepped.update(tokens[:, :, t:t + 1], tokens[:, :, t:t + 1])
    prefilled.update(tokens, tokens)
    assert True in used  # the one-token steps wrote in place
    assert stepped.encoded_tokens == prefilled.encoded_tokens == 12 - 2 - 4
    for hist_s, hist_p in ((stepped.hist_k, prefilled.hist_k), (stepped.hist_v, prefilled.hist_v)):
        for name in ("codes", "norms"):
            torch.testing.assert_close(hist_s.parts()[name], hist_p.parts()[name], rtol=0, atol=0)
    for hist, codec in ((stepped.hist_k, stepped.codec_k), (stepped.hist_v, stepped.codec_v)):
        direct = kernels.encode(codec.q, tokens[:, :, 2:8])
        torch.testing.assert_close(hist.parts()["codes"], direct[0], rtol=0, atol=0)
        torch.testing.assert_close(hist.parts()["norms"], direct[1], rtol=0, atol=0)
        # ... and what the array-ops codec gives, up to float32 rounding next to a boundary
        ref = codec.q.encode(tokens[:, :, 2:8], check=False)
        same = (hist.parts()["codes"] == ref.codes).float().mean().item()
        assert same > 0.99, same


def test_encode_pair_into_equals_two_single_encodes():
    """Keys and values in one launch (different bits, rotations and codebooks) write exactly what two
    ``encode_into`` calls write, for rows of a strided buffer and several row blocks."""
    from tq_core.kernels.triton import encode as enc

    gen = torch.Generator().manual_seed(11)
    n, d = 40, 64
    x = (torch.randn(2 * n, d, generator=gen) * 2).to(DEV)
    xk, xv = x[::2], x[1::2]  # row stride 2 * d
    kinds, singles = [], []
    for bits, seed in ((4, 1), (2, 2)):
        c, b = _codebook_tensors(d, bits)
        consts = {"rot_t": torch.tensor(np.ascontiguousarray(rotation.haar(d, seed).T), dtype=torch.float32, device=DEV),
                  "boundaries": b, "centroids": c, "bits": bits, "symmetric": enc.symmetric(b, c, bits)}
        codes = torch.zeros(n, packing.packed_size(d, bits), dtype=torch.uint8, device=DEV)
        norms = torch.zeros(n, dtype=torch.float16, device=DEV)
        kinds.append(dict(consts, codes=codes, norms=norms))
        singles.append((consts, codes.clone(), norms.clone()))
    enc.encode_pair_into(xk, xv, *kinds, norm_correction=True)
    for (consts, codes, norms), xx, kind in zip(singles, (xk, xv), kinds):
        enc.encode_into(xx, consts["rot_t"], consts["boundaries"], consts["centroids"], bits=consts["bits"],
                        norm_correction=True, codes_out=codes, norms_out=norms, block_rows=16)
        torch.testing.assert_close(kind["codes"], codes, rtol=0, atol=0)
        torch.testing.assert_close(kind["norms"], norms, rtol=0, atol=0)
        assert kind["norms"].abs().min() > 0
    with pytest.raises(ValueError, match="codes must be"):
        enc.encode_pair_into(xk, xv, kinds[0], dict(kinds[1], codes=kinds[1]["codes"][:, :3]), norm_correction=True)


# ----------------------------------------------------------------------------- the static step

STATIC_CASES = [("K4V2+s4w8", 2, 2, 4, 64), ("K3V2+s0w4+c=1", 1, 2, 2, 128)]


def _static_pair(label, B, Hkv, D, dtype, gen, held=30):
    """Two stores of ``label`` holding the same ``held`` tokens, and a token source."""
    from tq_core.config import CacheConfig
    from tq_core.kvstore import LayerStore

    cfg = CacheConfig.parse(label)
    a, b = LayerStore(cfg, 3, D), LayerStore(cfg, 3, D)
    kv = lambda n: (torch.randn(B, Hkv, n, D, generator=gen) * 2 + 3).to(dtype).to(DEV)  # noqa: E731
    k0, v0 = kv(held), kv(held)
    a.update(k0, v0)
    b.update(k0, v0)
    return a, b, kv


def _same_state(a, b):
    assert a.length == b.length and a.encoded_tokens == b.encoded_tokens
    for ha, hb in ((a.hist_k, b.hist_k), (a.hist_v, b.hist_v)):
        pa, pb = ha.parts(), hb.parts()
        for name in pa:
            assert torch.equal(pa[name], pb[name]), f"{name} differ"
    assert torch.equal(a.win_k, b.win_k) and torch.equal(a.win_v, b.win_v)


@pytest.mark.parametrize("store_by", ["array-ops", "kernels"])
@pytest.mark.parametrize("case", STATIC_CASES, ids=lambda c: c[0])
def test_static_steps_equal_eager_steps(case, store_by, triton_everywhere, monkeypatch):
    """``graph_step.StaticLayer``: steps with every index on the device give the eager steps' outputs
    (to float rounding: the ring is read in another order) and, synced back, the same stored codes,
    window and length; eager steps then continue from there. ``store_by``: the spill and the ring
    write through the fused kernels at the clock's positions (``kernels.spill_at``, ``ring_write``;
    both stores then encode with the Triton kernel), or through torch's indexed ops."""
    from tq_core.graph_step import StaticLayer

    label, B, Hkv, G, D = case
    if store_by == "kernels" and not CUDA:
        from tq_core.kernels import triton as triton_pkg
        from tq_core.ops import torch_ops

        monkeypatch.setattr(torch_ops, "encode_kernel", lambda like: triton_pkg)
    elif store_by == "array-ops":
        from tq_core import kernels

        monkeypatch.setattr(kernels, "spill_at", lambda *a: False)
        monkeypatch.setattr(kernels, "ring_write", lambda *a: False)
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(11)
    a, b, kv = _static_pair(label, B, Hkv, D, dtype, gen)
    clock = torch.full((1,), 5, dtype=torch.int64, device=DEV)  # shared, not at 0: the ring starts rotated
    static = StaticLayer(a, capacity=64, clock=clock)
    scale = D ** -0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for _ in range(12):  # more than the window: the ring wraps
        q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(dtype).to(DEV)
        k, v = kv(1), kv(1)
        fast = static.step(q, k, v, scale)
        clock.add_(1)  # the caller moves a shared clock on
        ref = b.update(k, v).attend(q, scale, kernel=True)
        err = ((fast.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < tol, err
    static.sync()
    _same_state(a, b)
    q, k, v = torch.randn(B, Hkv * G, 1, D, generator=gen).to(dtype).to(DEV), kv(1), kv(1)
    assert torch.allclose(a.update(k, v).attend(q, scale).float(), b.update(k, v).attend(q, scale).float(),
                          rtol=0, atol=tol)


def test_static_step_refuses_what_it_cannot_take():
    from tq_core.config import CacheConfig
    from tq_core.graph_step import StaticLayer
    from tq_core.kvstore import LayerStore

    store = LayerStore(CacheConfig.parse("K4V2+s4w8"), 0, 64)
    store.update(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    with pytest.raises(ValueError, match="steady state"):
        StaticLayer(store, 64)  # nothing encoded yet
    store.update(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    with pytest.raises(ValueError, match="capacity must be an int > the 8 encoded"):
        StaticLayer(store, 8)
    with pytest.raises(ValueError, match="span"):
        StaticLayer(LayerStore(CacheConfig.parse("K4V2+s4w8"), 0, 64, span=40), 64)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_static_steps_replay_as_a_cuda_graph():
    """One static step of two layers captured once and replayed: the same outputs and stored codes
    as eager steps fed the same tokens."""
    from tq_core.graph_step import StaticLayer

    B, Hkv, G, D = 2, 8, 4, 128
    gen = torch.Generator().manual_seed(12)
    pairs = [_static_pair("K4V2+s4w128", B, Hkv, D, torch.bfloat16, gen, held=300) for _ in range(2)]
    statics = [StaticLayer(a, capacity=400) for a, _, _ in pairs]
    scale = D ** -0.5
    q_in = torch.zeros(B, Hkv * G, 1, D, dtype=torch.bfloat16, device=DEV)
    kv_in = [tuple(torch.zeros(B, Hkv, 1, D, dtype=torch.bfloat16, device=DEV) for _ in range(2)) for _ in pairs]
    outs = [torch.empty(B, Hkv * G, 1, D, dtype=torch.bfloat16, device=DEV) for _ in pairs]
    steps = []
    for _ in range(6):  # the first: eager (compiles, caches constants); then the graph replays
        q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(DEV, torch.bfloat16)
        new = [(pairs[i][2](1), pairs[i][2](1)) for i in range(2)]
        steps.append((q, new))
    q_in.copy_(steps[0][0])
    for i, st in enumerate(statics):
        kv_in[i][0].copy_(steps[0][1][i][0]), kv_in[i][1].copy_(steps[0][1][i][1])
        st.step(q_in, *kv_in[i], scale, out=outs[i])
    torch.cuda.synchronize()
    got = [[o.clone() for o in outs]]
    graph = torch.cuda.CUDAGraph()
    # capture: the launches are recorded, not run (the state does not move)
    with torch.cuda.graph(graph):
        for i, st in enumerate(statics):
            st.step(q_in, *kv_in[i], scale, out=outs[i])
    for q, new in steps[1:]:
        q_in.copy_(q)
        for i in range(2):
            kv_in[i][0].copy_(new[i][0]), kv_in[i][1].copy_(new[i][1])
        graph.replay()
        got.append([o.clone() for o in outs])
    for i, (a, b, _) in enumerate(pairs):
        for t, (q, new) in enumerate(steps):
            ref = b.update(*new[i]).attend(q, scale)
            err = ((got[t][i].double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < 1e-2, (i, t, err)
        statics[i].sync()
        _same_state(a, b)
