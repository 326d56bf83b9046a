"""The C encode of a decode step's rows (tq_core/kernels/cpu/encode.c) against TurboQuantizer.encode.

Codes must equal the array-ops encode's except where float32 rounding decides (a coordinate within
1e-5 / sqrt(D) of a boundary in the float64 rotation), norms within one fp16 ulp. Outputs are
poisoned before every call, strided cases write into slots of larger buffers (and must not touch
their neighbours). A cache store in its steady state encodes each decode step's spilled token
through this kernel, a prefill's many rows through array ops.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: pip install 'tq-core[torch]'")

from tq_core import packing, rotation  # noqa: E402
from tq_core.config import CacheConfig  # noqa: E402
from tq_core.kernels import cpu  # noqa: E402
from tq_core.kvstore import LayerStore  # noqa: E402
from tq_core.quantizer import TurboQuantizer  # noqa: E402

import kernel_parity as kp  # noqa: E402

OK, WHY = cpu.available()
if not OK:
    pytest.skip(f"CPU kernel library unavailable: {WHY}", allow_module_level=True)

CASES = [
    dict(N=3, D=64, bits=4, x="bf16", nc=True),
    dict(N=64, D=128, bits=2, x="fp32", nc=True, strided=True),
    dict(N=24, D=64, bits=3, x="fp16", nc=True),
    dict(N=17, D=128, bits=1, x="fp32", nc=False, strided=True),
    dict(N=9, D=32, bits=8, x="bf16", nc=True),
    dict(N=23, D=96, bits=5, x="fp32", nc=True),
    dict(N=5, D=256, bits=4, x="fp32", nc=True),
    dict(N=1, D=20, bits=6, x="fp32", nc=True),
    dict(N=11, D=64, bits=7, x="fp16", nc=False),
]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _consts(D: int, bits: int, nc: bool):
    q = TurboQuantizer(D, bits, seed=5, norm_correction=nc)
    rot_t = torch.tensor(np.ascontiguousarray(rotation.haar(D, 5).T), dtype=torch.float32)
    b = torch.tensor(q.codebook.boundaries, dtype=torch.float32)
    c = torch.tensor(q.codebook.centroids, dtype=torch.float32)
    return q, rot_t, b, c


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_encode_into_matches_quantizer(case):
    N, D, bits = case["N"], case["D"], case["bits"]
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    x = (torch.randn(N, 2 * D, generator=gen) * torch.exp(torch.randn(N, 1, generator=gen))).to(kp.DTYPES[case["x"]])
    x = x[:, ::2]  # a column stride of 2: the kernel walks any strides
    q, rot_t, b, c = _consts(D, bits, case["nc"])
    nb = packing.packed_size(D, bits)
    codes, norms, buffers = kp.poisoned_outputs(N, nb, case.get("strided", False))
    cpu.encode_into(x, rot_t, b, c, bits=bits, norm_correction=case["nc"], codes_out=codes, norms_out=norms)
    kp.check_untouched(nb, buffers)
    kp.check_encoded(q, x, codes, norms)


def test_zero_and_huge_rows_store_what_the_array_ops_store():
    """A zero vector stores norm 0 and the codes of y = 0; a norm beyond fp16 stores inf (as the
    array ops' cast does: the caches encode with check=False)."""
    D, bits = 64, 4
    q, rot_t, b, c = _consts(D, bits, True)
    x = torch.zeros(2, D)
    x[1] = 1e5
    codes, norms, _ = kp.poisoned_outputs(2, packing.packed_size(D, bits), False)
    cpu.encode_into(x, rot_t, b, c, bits=bits, norm_correction=True, codes_out=codes, norms_out=norms)
    ref = q.encode(x, check=False)
    assert torch.equal(codes, ref.codes)
    assert norms[0].item() == 0.0 and math.isinf(norms[1].item()) and math.isinf(ref.norms[1].item())


def test_encode_pair_into_equals_two_single_encodes():
    gen = torch.Generator().manual_seed(3)
    n, d = 12, 64
    x = torch.randn(2 * n, d, generator=gen).to(torch.bfloat16)
    xk, xv = x[::2], x[1::2]
    kinds, singles = [], []
    for bits, nc in ((4, True), (2, True)):
        _, rot_t, b, c = _consts(d, bits, nc)
        codes = torch.zeros(n, packing.packed_size(d, bits), dtype=torch.uint8)
        norms = torch.zeros(n, dtype=torch.float16)
        kinds.append(dict(rot_t=rot_t, boundaries=b, centroids=c, bits=bits, symmetric=False, codes=codes, norms=norms))
        singles.append((rot_t, b, c, bits, codes.clone(), norms.clone()))
    cpu.encode_pair_into(xk, xv, *kinds, norm_correction=True)
    for (rot_t, b, c, bits, codes, norms), xx, kind in zip(singles, (xk, xv), kinds):
        cpu.encode_into(xx, rot_t, b, c, bits=bits, norm_correction=True, codes_out=codes, norms_out=norms)
        assert torch.equal(kind["codes"], codes) and torch.equal(kind["norms"], norms)


def test_rejects_bad_inputs():
    D, bits = 64, 4
    _, rot_t, b, c = _consts(D, bits, True)
    codes, norms, _ = kp.poisoned_outputs(4, packing.packed_size(D, bits), False)
    x = torch.randn(4, D)
    kw = dict(bits=bits, norm_correction=True, codes_out=codes, norms_out=norms)
    with pytest.raises(ValueError, match="ENCODE_MAX_ROWS"):
        n = cpu.ENCODE_MAX_ROWS + 1
        big, bign, _ = kp.poisoned_outputs(n, codes.shape[1], False)
        cpu.encode_into(torch.randn(n, D), rot_t, b, c, **{**kw, "codes_out": big, "norms_out": bign})
    with pytest.raises(ValueError, match="codes_out"):
        cpu.encode_into(x, rot_t, b, c, **{**kw, "codes_out": codes[:, :5]})
    with pytest.raises(ValueError, match="bits"):
        cpu.encode_into(x, rot_t, b, c, **{**kw, "bits": 9})
    with pytest.raises(ValueError, match="x must be"):
        cpu.encode_into(x.to(torch.int32), rot_t, b, c, **kw)
    with pytest.raises(ValueError, match="rot_t"):
        cpu.encode_into(x, rot_t.T, b, c, **kw)
    assert torch.equal(codes, torch.full_like(codes, 0xAB)), "a rejected call wrote"


def test_store_encodes_decode_spills_in_c_and_prefills_in_array_ops(monkeypatch):
    """A steady-state decode step's spilled token goes through the C encode (one call, keys and values)
    and holds what the array-ops encode of that token holds; a prefill's rows do not."""
    calls = []
    real = cpu._encode
    monkeypatch.setattr(cpu, "_encode", lambda xs, kinds, nc: (calls.append(xs[0].shape[0]), real(xs, kinds, nc))[1])
    cfg = CacheConfig.parse("K4V2+s4w8")
    st = LayerStore(cfg, 0, 64)
    gen = torch.Generator().manual_seed(9)
    kv = lambda n: torch.randn(1, 3, n, 64, generator=gen)  # noqa: E731
    st.update(kv(cpu.ENCODE_MAX_ROWS), kv(cpu.ENCODE_MAX_ROWS))  # 3 x 52 spilled rows per kind
    assert calls == [], "a prefill's rows went through the C encode"
    oldest_k, oldest_v = st.win_k[:, :, :1].clone(), st.win_v[:, :, :1].clone()
    n = st.hist_k.held
    st.update(kv(1), kv(1))
    assert calls == [3], calls
    assert st.hist_k.held == n + 1
    for codec, x, hist in ((st.codec_k, oldest_k, st.hist_k), (st.codec_v, oldest_v, st.hist_v)):
        ref = codec.q.encode(x.float(), check=False)
        got_codes = hist.buffers["codes"][:, :, n:n + 1]
        got_norms = hist.buffers["norms"][:, :, n:n + 1]
        assert torch.equal(got_codes, ref.codes), "spilled codes differ from the array-ops encode"
        assert torch.equal(got_norms, ref.norms)
