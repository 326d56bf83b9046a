"""Parity of the C attention kernel (tq_core/kernels/cpu) with the codec it reads, and its build cache.

attend_codes is checked against float64 attention over the SAME stored codes (TurboQuantizer.encode
gives the packed layout; packing.unpack + centroids in the rotated space), and end to end against
softmax(q k_hat^T * scale) v_hat with k_hat, v_hat = TurboQuantizer.decode (out = o_rot @ R_v).
Inputs are fresh random draws per case; outputs are poisoned (NaN) before every call. Every case
runs on the build for this CPU; on x86-64 a subset also runs the AVX2 build (-march=x86-64-v3) and
the portable build (-march=x86-64, no vector decoders), so all three decode paths are held to the
same reference. No test here asserts speed: bench/kernels_cpu.py and docs/kernels.md hold timings.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: pip install 'tq-core[torch]'")

from tq_core import packing, rotation  # noqa: E402
from tq_core.kernels import cpu  # noqa: E402
from tq_core.quantizer import Encoded, TurboQuantizer  # noqa: E402

import kernel_parity as kp  # noqa: E402

OK, WHY = cpu.available()
if not OK:
    pytest.skip(f"CPU attention kernel unavailable: {WHY}", allow_module_level=True)

K_SEED, V_SEED = 101, 202
REL_TOL, LSE_TOL = 1e-5, 1e-5
X86 = platform.machine().lower() in ("x86_64", "amd64")
REPO = Path(__file__).resolve().parents[1]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("-".join(map(str, parts)).encode()))


def _stored(B, Hkv, cap, D, bits, seed, gen, strided):
    """Encoded random history as (B, Hkv, cap, bytes) codes and (B, Hkv, cap) norms.

    strided: views into larger buffers (an extra head, every other token, padded rows, norms
    token-major), the way a cache with spare capacity hands them over.
    """
    q = TurboQuantizer(D, bits, seed)
    x = torch.randn(B, Hkv, cap, D, generator=gen) * (0.5 + torch.rand(B, Hkv, cap, 1, generator=gen) * 3)
    e = q.encode(x, check=False)
    codes, norms = e.codes, e.norms
    if strided:
        big = torch.randint(0, 256, (B, Hkv + 1, 2 * cap, codes.shape[-1] + 8), generator=gen, dtype=torch.uint8)
        big[:, 1:, ::2, 3:3 + codes.shape[-1]] = codes
        codes = big[:, 1:, ::2, 3:3 + codes.shape[-1]]
        bign = torch.randn(B, 2 * cap, Hkv, generator=gen).to(torch.float16)
        bign[:, ::2, :] = norms.transpose(1, 2)
        norms = bign[:, ::2, :].transpose(1, 2)
    return q, codes, norms


def _centroids(q: TurboQuantizer) -> torch.Tensor:
    return torch.tensor(q.codebook.centroids, dtype=torch.float32)


def _reference(qrot, qk, kc, kn, qv, vc, vn, length, scale):
    """float64 attention in the rotated space from the stored codes: (o_rot, lse)."""
    D = qk.dim
    B, Hq, Tq, _ = qrot.shape
    Hkv = kc.shape[1]
    ck = torch.tensor(qk.codebook.centroids, dtype=torch.float64)
    cv = torch.tensor(qv.codebook.centroids, dtype=torch.float64)
    k = ck[packing.unpack(kc[:, :, :length].contiguous(), qk.bits, D).long()] * kn[:, :, :length].double()[..., None]
    v = cv[packing.unpack(vc[:, :, :length].contiguous(), qv.bits, D).long()] * vn[:, :, :length].double()[..., None]
    G = Hq // Hkv
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = scale * qrot.double() @ k.transpose(-1, -2)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _decoded_reference(qrot, qk, kc, kn, qv, vc, vn, length, scale, G):
    """float64 attention in the original space over TurboQuantizer.decode of the stored vectors."""
    def dec(q, codes, norms):
        enc = Encoded(codes[:, :, :length].contiguous(), norms[:, :, :length].contiguous(), q.dim, q.bits,
                      torch.float32, q.seed)
        return q.decode(enc, dtype=torch.float64).repeat_interleave(G, 1)

    kh, vh = dec(qk, kc, kn), dec(qv, vc, vn)
    rk = torch.tensor(rotation.haar(qk.dim, qk.seed), dtype=torch.float64)
    q = qrot.double() @ rk  # q_rot = q @ R_k.T  ->  q = q_rot @ R_k
    return torch.softmax(scale * q @ kh.transpose(-1, -2), -1) @ vh


def _run(case, gen, arch=cpu.ARCH_NATIVE, fast=True, threads=1, decoded=False, openmp=True):
    B, Hkv, G, Tq, D = case["B"], case["Hkv"], case["G"], case["Tq"], case["D"]
    bk, bv, length, cap = case["bk"], case["bv"], case["len"], case["cap"]
    qk, kc, kn = _stored(B, Hkv, cap, D, bk, K_SEED, gen, case.get("strided", False))
    qv, vc, vn = _stored(B, Hkv, cap, D, bv, V_SEED, gen, case.get("strided", False))
    rk = torch.tensor(rotation.haar(D, K_SEED), dtype=torch.float32)
    qrot = (torch.randn(B, Hkv * G, Tq, D, generator=gen) * 0.4) @ rk.T
    scale = 1.0 / math.sqrt(D)
    o = torch.full((B, Hkv * G, Tq, D), math.nan)
    lse = torch.full((B, Hkv * G, Tq), math.nan)
    ret = cpu.attend_codes(qrot, kc, kn, vc, vn, _centroids(qk), _centroids(qv), bits_k=bk, bits_v=bv,
                           length=length, scale=scale, out=(o, lse), arch=arch, fast=fast, threads=threads,
                           openmp=openmp)
    assert ret[0] is o and ret[1] is lse
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten (poisoned) outputs"
    if length == 0:
        assert torch.equal(o, torch.zeros_like(o)) and bool((lse == -math.inf).all())
        return
    ro, rl = _reference(qrot, qk, kc, kn, qv, vc, vn, length, scale)
    err = ((o.double() - ro).norm() / ro.norm()).item()
    lse_err = (lse.double() - rl).abs().max().item()
    assert err <= REL_TOL, f"relative error {err:.3g} > {REL_TOL}"
    assert lse_err <= LSE_TOL, f"lse error {lse_err:.3g} > {LSE_TOL}"
    if decoded:
        ref = _decoded_reference(qrot, qk, kc, kn, qv, vc, vn, length, scale, G)
        rv = torch.tensor(rotation.haar(D, V_SEED), dtype=torch.float64)
        err2 = ((o.double() @ rv - ref).norm() / ref.norm()).item()
        assert err2 <= REL_TOL, f"original-space relative error {err2:.3g} > {REL_TOL}"


# ------------------------------------------------------------------------------ parity

CASES = [  # easy -> hard
    dict(B=1, Hkv=1, G=1, Tq=1, D=128, bk=4, bv=2, len=1, cap=1),
    dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=17, cap=17),
    dict(B=2, Hkv=2, G=1, Tq=5, D=128, bk=3, bv=3, len=17, cap=40, strided=True),
    dict(B=2, Hkv=2, G=8, Tq=1, D=128, bk=2, bv=4, len=1000, cap=1000),
    dict(B=2, Hkv=2, G=4, Tq=5, D=128, bk=8, bv=1, len=1000, cap=1030, strided=True),
    dict(B=2, Hkv=1, G=4, Tq=1, D=128, bk=1, bv=8, len=1000, cap=1000),
    dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=5, bv=7, len=1000, cap=1003),
    dict(B=2, Hkv=1, G=8, Tq=5, D=128, bk=6, bv=3, len=1000, cap=1000),
    dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=4097, cap=4200, strided=True),
    dict(B=2, Hkv=2, G=8, Tq=5, D=128, bk=3, bv=3, len=4097, cap=4097),
    dict(B=2, Hkv=2, G=4, Tq=1, D=64, bk=4, bv=2, len=1000, cap=1001),  # another fast-path dim
    dict(B=2, Hkv=2, G=4, Tq=5, D=96, bk=4, bv=2, len=1000, cap=1024, strided=True),  # portable decode
    dict(B=2, Hkv=1, G=1, Tq=1, D=40, bk=3, bv=5, len=17, cap=20),  # dim not a multiple of 16
    dict(B=2, Hkv=2, G=4, Tq=1, D=128, bk=4, bv=2, len=0, cap=8),
]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attend_codes_matches_float64_reference(case):
    _run(case, _seed(_case_id(case)), decoded=case["len"] in (17, 1000) and case["Tq"] == 1)


ARCHES = [("x86-64-v3", True), ("x86-64", False)] if X86 else []  # AVX2; portable (SSE2, table decode)
ARCH_CASES = [c for c in CASES if c["len"] in (17, 1000) and c["D"] in (64, 128)]


@pytest.mark.skipif(not X86, reason="the AVX2 / portable builds are x86-64 -march values")
@pytest.mark.parametrize("arch,fast", ARCHES, ids=[f"arch={a}" for a, _ in ARCHES])
@pytest.mark.parametrize("case", ARCH_CASES, ids=_case_id)
def test_other_builds_match_reference(case, arch, fast):
    try:
        cpu.load(arch)
    except cpu.BuildError as exc:
        pytest.skip(f"-march={arch} build unavailable: {exc}")
    _run(case, _seed(arch, _case_id(case)), arch=arch, fast=fast)


def test_portable_decode_matches_vector_decode():
    """fast=False forces the table decode (natural order) in the native build: same results."""
    case = dict(B=2, Hkv=2, G=4, Tq=5, D=128, bk=4, bv=2, len=301, cap=320)
    _run(case, _seed("portable"), fast=False)


@pytest.mark.parametrize("case", [
    dict(B=1, Hkv=1, G=4, Tq=1, D=128, bk=4, bv=2, len=4097, cap=4097),  # one pair: the sequence is split
    dict(B=1, Hkv=3, G=4, Tq=5, D=128, bk=3, bv=3, len=2000, cap=2100, strided=True),  # 3 pairs on 2 threads
    dict(B=2, Hkv=2, G=8, Tq=1, D=128, bk=2, bv=4, len=1000, cap=1000),  # pairs divide evenly
], ids=_case_id)
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "pthreads"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_match_reference(case, threads, openmp):
    _run(case, _seed("threads", threads, openmp, _case_id(case)), threads=threads, openmp=openmp)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP builds are Linux only")
def test_openmp_build_shares_torchs_runtime():
    """Loading the kernel adds no OpenMP runtime: its team is torch's own pool. Checked in a fresh
    process (other libraries of a test session may bring copies of their own, e.g. sentencepiece)."""
    kern = cpu.load()
    if not kern.openmp:
        pytest.skip("the compiler built the kernel without OpenMP (pthreads)")
    code = ("import torch, pathlib\n"
            "def gomp(): return {l.split()[-1] for l in pathlib.Path('/proc/self/maps').read_text().splitlines()"
            " if 'libgomp' in l.split()[-1]}\n"
            "before = gomp()\n"
            "from tq_core.kernels import cpu\n"
            "assert cpu.load().openmp\n"
            "after = gomp()\n"
            "print(len(before), len(after), sorted(after - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n_before, n_after, added = out.stdout.split(" ", 2)
    assert n_before == n_after == "1", f"OpenMP runtimes before/after loading the kernel: {out.stdout}"
    assert not cpu.load(openmp=False).openmp


def test_default_threads_follow_torch():
    case = dict(B=1, Hkv=8, G=4, Tq=1, D=128, bk=4, bv=2, len=4097, cap=4097)  # enough work for 2 threads
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _run(case, _seed("torch-threads"), threads=None)
    finally:
        torch.set_num_threads(old)


def test_rejects_bad_inputs():
    D, bits = 64, 4
    kc = torch.zeros(1, 2, 8, packing.packed_size(D, bits), dtype=torch.uint8)
    kn = torch.zeros(1, 2, 8, dtype=torch.float16)
    c = torch.zeros(16)
    kw = dict(bits_k=4, bits_v=4, length=8, scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        cpu.attend_codes(torch.zeros(1, 3, 1, D), kc, kn, kc, kn, c, c, **kw)
    q = torch.zeros(1, 2, 1, D)
    with pytest.raises(ValueError, match="length"):
        cpu.attend_codes(q, kc, kn, kc, kn, c, c, **{**kw, "length": 9})
    with pytest.raises(ValueError, match="shape"):
        cpu.attend_codes(q, kc, kn, kc, kn, c, c, **{**kw, "bits_k": 3})
    with pytest.raises(ValueError, match="centroids"):
        cpu.attend_codes(q, kc, kn, kc, kn, torch.zeros(8), c, **kw)
    with pytest.raises(ValueError, match="float16"):
        cpu.attend_codes(q, kc, kn.float(), kc, kn, c, c, **kw)
    with pytest.raises(ValueError, match="last axis"):
        wide = torch.zeros(1, 2, 8, 2 * packing.packed_size(D, bits), dtype=torch.uint8)[..., ::2]
        cpu.attend_codes(q, wide, kn, kc, kn, c, c, **kw)


def test_view_attend_uses_the_kernel_and_agrees_with_array_ops():
    """The cache's own path: View.attend through the kernel equals View.attend in array ops."""
    from tq_core import CacheConfig
    from tq_core.kvstore import LayerStore

    gen = _seed("view")
    store = LayerStore(CacheConfig(), layer=3, head_dim=128)
    store.update(torch.randn(1, 8, 700, 128, generator=gen), torch.randn(1, 8, 700, 128, generator=gen))
    view = store.update(torch.randn(1, 8, 1, 128, generator=gen), torch.randn(1, 8, 1, 128, generator=gen))
    assert view.history > 0
    q = torch.randn(1, 32, 1, 128, generator=gen)
    a = view.attend(q, 128 ** -0.5, kernel=True)
    b = view.attend(q, 128 ** -0.5, kernel=False)
    assert ((a - b).norm() / b.norm()).item() <= REL_TOL


# ------------------------------------------------------------------------------ build and cache


def _env(tmp_path, **extra):
    env = {**os.environ, "TQ_CACHE_DIR": str(tmp_path), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_library_is_cached_and_a_corrupted_copy_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    before = cpu.builds
    path = cpu.library_path()
    assert cpu.builds == before + 1 and path.parent == tmp_path / "kernels"
    stamp = path.stat().st_mtime_ns
    assert cpu.library_path() == path and cpu.builds == before + 1, "a valid cached library was rebuilt"
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary files left behind"

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the code
    path.write_bytes(bytes(data))
    assert cpu.library_path() == path and cpu.builds == before + 2, "a corrupted library was not rebuilt"
    path.write_bytes(b"\x7fELF truncated")
    assert cpu.library_path() == path and cpu.builds == before + 3, "a truncated library was not rebuilt"

    # The rebuilt file loads and computes (never loaded before in this process: no dlopen alias).
    kern = cpu._Kernel(path)
    assert kern.isa in ("avx512", "avx2", "generic")


def test_second_process_loads_without_compiling(tmp_path):
    code = ("from tq_core.kernels import cpu; ok, why = cpu.available(); assert ok, why; print(cpu.builds)")
    runs = [subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert [r.stdout.strip() for r in runs] == ["1", "0"]


def test_parallel_first_uses_are_safe(tmp_path):
    code = "from tq_core.kernels import cpu; print(cpu.library_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    files = list((tmp_path / "kernels").iterdir())
    assert [f.name for f in files] == [Path(paths.pop()).name], "temporary files left behind"
    assert cpu.cached(files[0])


@pytest.mark.parametrize("case", ["no-compiler", "build-fails", "disabled"])
def test_unavailable_says_why_and_never_raises_at_import(tmp_path, case):
    if case == "no-compiler":
        extra, why = dict(CC="", PATH=""), "no C compiler"
    elif case == "build-fails":  # a compiler that answers --version and rejects every build
        fake = tmp_path / "fakecc"
        fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fakecc 1.0; exit 0; }\n'
                        'echo "error: broken compiler" >&2\nexit 1\n')
        fake.chmod(0o755)
        extra, why = dict(CC=str(fake)), "broken compiler"
    else:
        extra, why = dict(TQ_CPU_KERNEL="0"), "TQ_CPU_KERNEL=0"
    code = "from tq_core.kernels import cpu; ok, why = cpu.available(); print(ok); print(why)"
    res = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, **extra), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ok, reason = res.stdout.split("\n", 1)
    assert ok == "False" and why in reason, res.stdout
    assert not list((tmp_path / "kernels").glob("*.so")) if (tmp_path / "kernels").exists() else True


# ----------------------------------------------------------------------------- the whole call

STEP_CASES = [
    # (config, dtype, B, Hkv, G, held, Tq, D): held tokens before the call, Tq new tokens (the queries)
    ("K4V2+s4w8", "fp32", 1, 2, 4, 40, 1, 64),
    ("K4V2+s4w8", "bf16", 2, 1, 3, 70, 1, 128),
    ("K3V4+s0w0", "fp32", 1, 2, 2, 33, 3, 64),     # no sinks, no window: history + own tokens
    ("K2V3+s2w16", "fp16", 1, 1, 4, 12, 2, 32),    # no history yet: full-precision tokens only
    ("K4V4+s4w4", "bf16", 1, 2, 8, 50, 2, 64),     # G * Tq = 16 rows
    ("K4V2+s4w8", "fp32", 1, 1, 2, 40, 1, 256),    # head_dim 256 (Gemma-3)
    ("K4V2+s4w8+c=1", "fp32", 1, 2, 4, 40, 1, 64),  # centered keys
    ("K8V5+s1w3", "fp32", 2, 3, 3, 90, 1, 96),     # other widths and a head_dim not a power of two
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-B{c[2]}H{c[3]}G{c[4]}n{c[5]}t{c[6]}d{c[7]}")
def test_attention_step_matches_array_ops(case):
    """View.attend through the C whole call (history kernel + step.c) equals the array-ops path over
    the same stored codes and the decoded reference within the codes' own error, causal among the
    own tokens, for a non-contiguous query."""
    dtype = kp.DTYPES[case[1]]
    whole_call, fast, err, err_ref = kp.attention_step_errors(case, _seed(*case))
    assert whole_call
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # 16-bit: one rounding of the output each way
    assert err < tol, f"relative error vs array ops {err:.3g} >= {tol}"
    assert err_ref < tol + 1e-6, f"relative error vs decoded reference {err_ref:.3g}"


def test_attention_step_rejects_bad_inputs():
    q = torch.randn(1, 4, 1, 64)
    kv = (torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64))
    with pytest.raises(ValueError, match="device clock"):
        cpu.attend_step(q, 0.1, (kv, None, None), length_dev=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="three"):
        cpu.attend_step(q, 0.1, (kv, None))
    with pytest.raises(ValueError, match="dense tokens"):
        cpu.attend_step(q, 0.1, ((kv[0][..., :32], kv[1][..., :32]), None, None))
    with pytest.raises(ValueError, match="same tokens"):
        cpu.attend_step(q, 0.1, ((kv[0], kv[1][:, :, :4]), None, None))
    with pytest.raises(ValueError, match="query rows"):
        cpu.attend_step(torch.randn(1, 34, 1, 64), 0.1, (kv, None, None))
    with pytest.raises(ValueError, match="nothing to attend"):
        cpu.attend_step(q, 0.1, (None, None, None))
