"""Check and time the Triton kernels (tq_core/kernels/triton) on one CUDA GPU, in one call.

    python bench/kernels_h200.py [--quick] [--out DIR]

1. ceilings: device-to-device copy bandwidth (bytes read + written);
2. native parity: attend_codes (both lookups) against float64 attention over the same codes,
   encode_into against TurboQuantizer.encode (code flips, norm ulps);
3. decode attention: attend_codes (Llama-3-8B attention: Hq=32, Hkv=8, D=128, K4/V2, bf16
   queries, Tq=1) against torch SDPA in bf16 (enable_gqa=True, K/V preallocated (B, Hkv, T, D)),
   batch x context; variants (lookup, block, splits, stages) at two sizes;
4. fused encode: GB/s of bf16 input at D=128, K4 and V2, against the torch reference encode.

Times are medians of triton.testing.do_bench (it flushes L2 between runs; warm-up first). Codes
for timing are uniform random bytes (every code equally likely), norms random positive fp16.
Effective GB/s counts the bytes the cache holds (codes + fp16 norms, plus the queries) over the
kernel time; SDPA's counts its bf16 K/V. Writes everything to DIR/kernels_h200.json (DIR: --out,
else $OUT, else bench_out/) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from tq_core import codebook, packing, rotation  # noqa: E402
from tq_core.kernels.triton import decode_attention as da  # noqa: E402
from tq_core.kernels.triton import encode as enc  # noqa: E402

HQ, HKV, D, BK, BV = 32, 8, 128, 4, 2
DEV = torch.device("cuda")
RESULTS: dict = {}
OUT_PATH = ""


def save():
    with open(OUT_PATH, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def bench(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def cent(dim, bits):
    cb = codebook.load(dim, bits)
    return (torch.tensor(cb.centroids, dtype=torch.float32, device=DEV),
            torch.tensor(cb.boundaries.astype(np.float32), device=DEV))


# ----------------------------------------------------------------------------- ceilings


def ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), rep=50)
    del a, b
    RESULTS["copy_tbps"] = 2 * n / t / 1e6
    print(f"device-to-device copy: {RESULTS['copy_tbps']:.2f} TB/s (read + write)", flush=True)


# ----------------------------------------------------------------------------- parity


def check_attend():
    from tq_core.quantizer import TurboQuantizer

    out = []
    g = torch.Generator().manual_seed(0)
    B, T, Tq = 2, 4097, 1
    qk, qv = TurboQuantizer(D, BK, 11), TurboQuantizer(D, BV, 12)
    kx = torch.randn(B, HKV, T, D, generator=g) * 2
    vx = torch.randn(B, HKV, T, D, generator=g)
    ek, ev = qk.encode(kx.to(DEV), check=False), qv.encode(vx.to(DEV), check=False)
    q = torch.randn(B, HQ, Tq, D, generator=g) * 0.3
    rk = torch.tensor(rotation.haar(D, 11), dtype=torch.float32)
    qrot = (q @ rk.T).to(torch.bfloat16).to(DEV)
    ck, _ = cent(D, BK)
    cv, _ = cent(D, BV)
    kcode = packing.unpack(ek.codes.cpu(), BK, D).long()
    vcode = packing.unpack(ev.codes.cpu(), BV, D).long()
    k = torch.tensor(qk.codebook.centroids)[kcode] * ek.norms.cpu().double()[..., None]
    v = torch.tensor(qv.codebook.centroids)[vcode] * ev.norms.cpu().double()[..., None]
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    s = qrot.cpu().double() @ k.transpose(-1, -2) / math.sqrt(D)
    ro, rl = torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    for lut in ("asm", "load"):
        o = torch.full((B, HQ, Tq, D), math.nan, device=DEV)
        lse = torch.full((B, HQ, Tq), math.nan, device=DEV)
        da.attend_codes(qrot, ek.codes, ek.norms, ev.codes, ev.norms, ck, cv, bits_k=BK, bits_v=BV,
                        length=T, scale=1 / math.sqrt(D), lut=lut, out=(o, lse))
        o, lse = o.cpu().double(), lse.cpu().double()
        rec = dict(what="attend", lut=lut, B=B, T=T, rel_err=((o - ro).norm() / ro.norm()).item(),
                   lse_err=(lse - rl).abs().max().item(), nan=bool(torch.isnan(o).any() or torch.isnan(lse).any()))
        out.append(rec)
        print("check", rec, flush=True)
    return out


def check_encode():
    from tq_core.quantizer import TurboQuantizer

    out = []
    for bits, dt in ((4, torch.bfloat16), (2, torch.bfloat16), (3, torch.float16), (4, torch.float32)):
        N = 1 << 20
        x = (torch.randn(N, D, device=DEV) * torch.exp(torch.randn(N, 1, device=DEV))).to(dt)
        qz = TurboQuantizer(D, bits, 5)
        ref = qz.encode(x, check=False)
        rot_t = torch.tensor(np.ascontiguousarray(rotation.haar(D, 5).T), dtype=torch.float32, device=DEV)
        c, b = cent(D, bits)
        codes = torch.full((N, packing.packed_size(D, bits)), 0xAB, dtype=torch.uint8, device=DEV)
        norms = torch.full((N,), math.nan, dtype=torch.float16, device=DEV)
        enc.encode_into(x, rot_t, b, c, bits=bits, norm_correction=True, codes_out=codes, norms_out=norms)
        got = packing.unpack(codes, bits, D)
        want = packing.unpack(ref.codes, bits, D)
        bad = got != want
        rows_ok = ~bad.any(1)
        ulp = torch.finfo(torch.float16).eps * ref.norms.float().abs().clamp_min(2 ** -14)
        nerr = ((norms.float() - ref.norms.float()).abs() / ulp)[rows_ok]
        rec = dict(what="encode", bits=bits, dtype=str(dt), N=N, flips=int(bad.sum()),
                   flip_rate=float(bad.sum()) / bad.numel(), max_norm_ulps=float(nerr.max()),
                   nan=bool(torch.isnan(norms).any()))
        if rec["flips"]:
            x64 = x.double()
            y = (x64 @ torch.tensor(rotation.haar(D, 5), device=DEV).T) / x64.norm(dim=-1, keepdim=True)
            bnd = torch.tensor(qz.codebook.boundaries, device=DEV)
            dist = (y[bad][:, None] - bnd[None]).abs().min(1).values
            rec["max_flip_dist_to_boundary"] = float(dist.max())
        out.append(rec)
        print("check", rec, flush=True)
        del x, ref, codes, norms, got, want
    return out


# ----------------------------------------------------------------------------- decode timing


def cache(B, T):
    nbk, nbv = packing.packed_size(D, BK), packing.packed_size(D, BV)
    kc = torch.randint(0, 256, (B, HKV, T, nbk), dtype=torch.uint8, device=DEV)
    vc = torch.randint(0, 256, (B, HKV, T, nbv), dtype=torch.uint8, device=DEV)
    kn = (torch.rand(B, HKV, T, device=DEV) * 4 + 0.5).to(torch.float16)
    vn = (torch.rand(B, HKV, T, device=DEV) * 4 + 0.5).to(torch.float16)
    q = (torch.randn(B, HQ, 1, D, device=DEV) * 0.3).to(torch.bfloat16)
    held = B * HKV * T * (nbk + 2 + nbv + 2) + q.numel() * 2
    return q, kc, kn, vc, vn, held


def n_copies(nbytes):
    """Input copies to rotate through so that one pass over them is ~4x the 60 MB L2."""
    return int(min(128, max(1, math.ceil(240e6 / nbytes))))


def graph_time(fns, reps=20):
    """GPU time per call in us: the calls (one per input copy larger than L2, so the data stays cold)
    replayed as a CUDA graph, timed with CUDA events (``harness.hosts``' torch-cuda host)."""
    from harness import hosts

    return hosts.get("torch-cuda").gpu_time(list(fns), rounds=reps) * 1e6


def host_time(fn, n=200):
    """Host (launch) time per call: n back-to-back calls, one sync at the end."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def ours_fns(B, T, **kw):
    ck, _ = cent(D, BK)
    cv, _ = cent(D, BV)
    q, kc, kn, vc, vn, held = cache(B, T)
    fns = []
    for _ in range(n_copies(held)):
        if fns:
            q, kc, kn, vc, vn, _ = cache(B, T)
        o = torch.empty(B, HQ, 1, D, device=DEV)
        lse = torch.empty(B, HQ, 1, device=DEV)
        fns.append(lambda q=q, kc=kc, kn=kn, vc=vc, vn=vn, o=o, lse=lse: da.attend_codes(
            q, kc, kn, vc, vn, ck, cv, bits_k=BK, bits_v=BV, length=T, scale=1 / math.sqrt(D), out=(o, lse), **kw))
    return fns, held


def time_ours(B, T, host=False, **kw):
    fns, held = ours_fns(B, T, **kw)
    t = graph_time(fns)
    h = host_time(fns[0]) if host else None
    del fns
    torch.cuda.empty_cache()
    return t, held, h


def time_sdpa(B, T):
    held = 2 * B * HKV * T * D * 2 + B * HQ * D * 2
    fns = []
    for _ in range(n_copies(held)):
        q = (torch.randn(B, HQ, 1, D, device=DEV) * 0.3).to(torch.bfloat16)
        k = torch.randn(B, HKV, T, D, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(B, HKV, T, D, device=DEV, dtype=torch.bfloat16)
        fns.append(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    t = graph_time(fns)
    del fns
    torch.cuda.empty_cache()
    return t, held


def decode_table(quick):
    rows = []
    batches = (1, 8) if quick else (1, 4, 8, 16)
    ctxs = (4096, 32768) if quick else (1024, 4096, 16384, 32768, 65536, 131072)
    for B in batches:
        for T in ctxs:
            rec = dict(B=B, T=T)
            try:
                rec["sdpa_us"], sb = time_sdpa(B, T)
                rec["sdpa_GBps"] = sb / rec["sdpa_us"] / 1e3
            except Exception as e:  # noqa: BLE001
                rec["sdpa_error"] = repr(e)[:200]
            try:
                rec["ours_us"], ob, rec["ours_host_us"] = time_ours(B, T, host=(T == 4096))
                rec["ours_GBps"] = ob / rec["ours_us"] / 1e3
                rec["floor_us"] = ob / (RESULTS.get("copy_tbps", 4.3) * 1e6)
            except Exception as e:  # noqa: BLE001
                rec["ours_error"] = repr(e)[:300]
                traceback.print_exc()
            if "sdpa_us" in rec and "ours_us" in rec:
                rec["speedup"] = rec["sdpa_us"] / rec["ours_us"]
            rows.append(rec)
            print("decode", rec, flush=True)
            RESULTS["decode"] = rows
            save()
            torch.cuda.empty_cache()
    return rows


def decode_variants(quick):
    out = []
    sizes = ((8, 32768), (1, 32768))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [dict(lut="asm", block_n=64), dict(lut="asm", block_n=32), dict(lut="load", block_n=64),
                dict(lut="asm", block_n=64, num_stages=3), dict(lut="asm", block_n=64, maxnreg=168),
                dict(lut="asm", block_n=64, num_warps=2)]
    for mult in (4, 16, 32):
        variants.append(dict(lut="asm", block_n=64, splits="x%d" % mult))
    if quick:
        variants = variants[:3]
    for B, T in sizes:
        for v in variants:
            kw = dict(v)
            if isinstance(kw.get("splits"), str):
                kw["splits"] = max(1, int(kw["splits"][1:]) * sms // (B * HKV))
            rec = dict(B=B, T=T, **{k: str(x) for k, x in v.items()})
            try:
                rec["us"], held, _ = time_ours(B, T, **kw)
                rec["GBps"] = held / rec["us"] / 1e3
                rec["splits_used"] = kw.get("splits", "auto")
            except Exception as e:  # noqa: BLE001
                rec["error"] = repr(e)[:300]
            out.append(rec)
            print("variant", rec, flush=True)
            RESULTS["decode_variants"] = out
            save()
    return out


# ----------------------------------------------------------------------------- encode timing


def encode_table(quick):
    from tq_core.quantizer import TurboQuantizer

    out = []
    N = (1 << 21) if not quick else (1 << 19)
    x = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
    rot_t = torch.tensor(np.ascontiguousarray(rotation.haar(D, 5).T), dtype=torch.float32, device=DEV)
    for bits in (4, 2, 3):
        c, b = cent(D, bits)
        codes = torch.empty((N, packing.packed_size(D, bits)), dtype=torch.uint8, device=DEV)
        norms = torch.empty((N,), dtype=torch.float16, device=DEV)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        configs = [dict(), dict(num_stages=3), dict(block_rows=64, num_warps=4),
                   dict(programs=sms), dict(programs=4 * sms),
                   # two blocks per SM (112 KB of shared memory each), and other tile shapes
                   dict(block_rows=64, num_warps=4, num_stages=1, programs=2 * sms),
                   dict(block_rows=64, num_warps=4, num_stages=2, programs=2 * sms),
                   dict(block_rows=64, num_warps=8, num_stages=1, programs=2 * sms),
                   dict(block_rows=32, num_warps=4, num_stages=1, programs=2 * sms),
                   dict(block_rows=128, num_warps=8, num_stages=1, programs=sms)]
        if quick or bits == 3:
            configs = configs[:1]
        for cfg in configs:
            rec = dict(bits=bits, N=N, **{k: str(v) for k, v in cfg.items()})
            try:
                fn = lambda: enc.encode_into(x, rot_t, b, c, bits=bits, norm_correction=True,  # noqa: E731
                                             codes_out=codes, norms_out=norms, **cfg)
                fn()
                torch.cuda.synchronize()
                rec["us"] = bench(fn)
                rec["input_GBps"] = N * D * 2 / rec["us"] / 1e3
                rec["io_GBps"] = N * (D * 2 + codes.shape[1] + 2) / rec["us"] / 1e3
            except Exception as e:  # noqa: BLE001
                rec["error"] = repr(e)[:300]
                traceback.print_exc()
            out.append(rec)
            print("encode", rec, flush=True)
            RESULTS["encode"] = out
            save()
        if bits == 4:
            try:
                qz = TurboQuantizer(D, bits, 5)
                qz.encode(x, check=False)
                torch.cuda.synchronize()
                t = bench(lambda: qz.encode(x, check=False), rep=50)
                RESULTS["encode_torch_reference"] = dict(bits=bits, N=N, us=t, input_GBps=N * D * 2 / t / 1e3)
                print("encode torch reference", RESULTS["encode_torch_reference"], flush=True)
            except Exception as e:  # noqa: BLE001
                RESULTS["encode_torch_reference"] = dict(error=repr(e)[:200])
    return out


# ----------------------------------------------------------------------------- main


def main():
    global OUT_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench_out"))
    ap.add_argument("--skip", default="", help="comma list of: checks,decode,variants,encode")
    ap.add_argument("--profile", action="store_true",
                    help="only run decode (8 x 32k) and encode (2M rows, K4) twice each, for a profiler")
    args = ap.parse_args()
    if args.profile:
        fns, _ = ours_fns(8, 32768)
        fns = fns[:1]
        x = torch.randn(1 << 21, D, device=DEV, dtype=torch.bfloat16)
        rot_t = torch.tensor(np.ascontiguousarray(rotation.haar(D, 5).T), dtype=torch.float32, device=DEV)
        c, b = cent(D, BK)
        codes = torch.empty((x.shape[0], packing.packed_size(D, BK)), dtype=torch.uint8, device=DEV)
        norms = torch.empty((x.shape[0],), dtype=torch.float16, device=DEV)
        for _ in range(2):
            fns[0]()
            enc.encode_into(x, rot_t, b, c, bits=BK, norm_correction=True, codes_out=codes, norms_out=norms)
        torch.cuda.synchronize()
        return
    os.makedirs(args.out, exist_ok=True)
    OUT_PATH = os.path.join(args.out, "kernels_h200.json")
    skip = set(filter(None, args.skip.split(",")))
    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    RESULTS.update(device=props.name, sms=props.multi_processor_count, python=platform.python_version(),
                   torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, commit=commit,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), shape=dict(Hq=HQ, Hkv=HKV, D=D, bits_k=BK, bits_v=BV))
    print({k: RESULTS[k] for k in ("device", "torch", "triton", "cuda")}, flush=True)
    t0 = time.time()
    ceilings()
    if "checks" not in skip:
        RESULTS["checks"] = check_attend() + check_encode()
        save()
    if "decode" not in skip:
        decode_table(args.quick)
    if "variants" not in skip:
        decode_variants(args.quick)
    if "encode" not in skip:
        encode_table(args.quick)
    if "host" not in skip:
        import cProfile
        import io
        import pstats

        fns, _ = ours_fns(1, 4096)
        f = fns[0]
        f()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(100):
            f()
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
        RESULTS["host_profile"] = buf.getvalue()
        print(buf.getvalue()[-3500:])
    RESULTS["wall_s"] = time.time() - t0
    save()

    print("\n=== decode attention, Hq=32 Hkv=8 D=128 K4/V2 bf16 q, Tq=1 (" + RESULTS["device"] + ") ===")
    print("GPU time per call (CUDA graph of calls over rotating input copies > L2); floor = bytes held / copy rate")
    print(f"{'B':>3} {'ctx':>7} | {'ours us':>8} {'GB/s':>6} {'floor us':>8} | {'sdpa us':>8} {'GB/s':>6} | {'x':>5}")
    for r in RESULTS.get("decode", []):
        print(f"{r['B']:>3} {r['T']:>7} | {r.get('ours_us', float('nan')):8.1f} {r.get('ours_GBps', float('nan')):6.0f} "
              f"{r.get('floor_us', float('nan')):8.1f} | {r.get('sdpa_us', float('nan')):8.1f} "
              f"{r.get('sdpa_GBps', float('nan')):6.0f} | {r.get('speedup', float('nan')):5.2f}")
    for r in RESULTS.get("decode_variants", []):
        cfg = ",".join(f"{k}={v}" for k, v in r.items() if k not in ("B", "T", "us", "GBps", "splits_used", "error"))
        print(f"variant B={r['B']} T={r['T']} {cfg}: {r.get('us', float('nan')):.1f} us "
              f"{r.get('GBps', float('nan')):.0f} GB/s {r.get('error', '')}")
    for r in RESULTS.get("encode", []):
        cfg = ",".join(f"{k}={v}" for k, v in r.items() if k in ("block_rows", "num_warps", "programs", "num_stages"))
        print(f"encode bits={r['bits']} N={r['N']} {cfg}: {r.get('us', float('nan')):.0f} us, "
              f"{r.get('input_GBps', float('nan')):.0f} GB/s bf16 in {r.get('error', '')}")
    hosts = [f"B={r['B']}: {r['ours_host_us']:.0f}" for r in RESULTS.get("decode", []) if r.get("ours_host_us")]
    if hosts:
        print("host time per attend_codes call at ctx 4096 (us):", ", ".join(hosts))
    if "encode_torch_reference" in RESULTS:
        print("encode torch reference:", RESULTS["encode_torch_reference"])
    for c in RESULTS.get("checks", []):
        print("check", c)
    print(f"copy {RESULTS['copy_tbps']:.2f} TB/s; wall {RESULTS['wall_s']:.0f} s; json {OUT_PATH}")


if __name__ == "__main__":
    main()
