"""Time decode attention over the compressed cache on the CPU: the C kernel against the torch paths.

    python bench/kernels_cpu.py [--lengths 1024 4096 16384] [--threads 1 2] [--rounds 30] [--json FILE]

Shape: Llama-3-8B attention, one decode step (batch 1, 32 query heads over 8 KV heads, head dim
128, one new token), K 4 bits / V 2 bits. Per context length T and torch thread count:

  kernel          tq_core.kernels.cpu.attend_codes over T packed tokens (rotated query in, o_rot out)
  kernel, cold    the same, cycling through enough copies of the layer (>= 64 MiB, at most 32 layers)
                  that every call reads its codes from DRAM, as a decode step over many layers does
  View, kernel    LayerStore(CacheConfig()): store.update(k, v) with T tokens, then one new token;
                  View.attend(q, scale): query rotation, the kernel over the history, sinks + window +
                  the new token in full precision, log-sum-exp merge, rotation back
  View, torch     the same View.attend with kernel=False (torch eager ops in the rotated space)
  SDPA fp32       torch scaled_dot_product_attention(enable_gqa=True) over a preallocated fp32
                  (1, 8, T, 128) K/V cache (as the torch host calls it); "cold" cycles through copies
                  as above
  SDPA fp32, rows the same cache with the 4 query heads of each KV head passed as 4 query rows,
                  q.view(1, 8, 4, 128): the fastest fp32 call found here (K/V read once per KV head)

"Hot" numbers re-read the same layer (one untimed call right before each timed one); "cold"
ones the next copy. Every number is the median of ``--rounds`` timed calls after warm-up; the methods are interleaved
round by round, so a change of machine load during a run hits all of them alike. The load average
is printed before and after: on a shared machine, compare numbers from the same run only. Bytes:
the kernel reads codes + fp16 norms (100 B per token per KV head at K4/V2, D=128); SDPA reads
fp32 K and V (1024 B per token per KV head).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tq_core import CacheConfig  # noqa: E402
from tq_core.kernels import cpu  # noqa: E402
from tq_core.kvstore import LayerStore  # noqa: E402
from tq_core.quantizer import TurboQuantizer  # noqa: E402

HQ, HKV, D, BK, BV = 32, 8, 128, 4, 2
COLD_BYTES = 64 << 20  # twice this machine's L3: a layer cycled through this much is read from DRAM
MAX_LAYERS = 32


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copies(nbytes: int) -> int:
    return max(2, min(MAX_LAYERS, math.ceil(COLD_BYTES / nbytes)))


def build(T: int, gen: torch.Generator, arch: str = cpu.ARCH_NATIVE) -> dict:
    """Callables for one context length: name -> (fn, bytes read per call or None)."""
    scale = D ** -0.5
    qk, qv = TurboQuantizer(D, BK, 1), TurboQuantizer(D, BV, 2)
    ck = torch.tensor(qk.codebook.centroids, dtype=torch.float32)
    cv = torch.tensor(qv.codebook.centroids, dtype=torch.float32)
    q = torch.randn(1, HQ, 1, D, generator=gen)
    q_rot = qk.rotate(q)

    def layer():
        ek = qk.encode(torch.randn(1, HKV, T, D, generator=gen), check=False)
        ev = qv.encode(torch.randn(1, HKV, T, D, generator=gen), check=False)
        return ek.codes, ek.norms, ev.codes, ev.norms

    held = HKV * T * (qk.code_bytes + 2 + qv.code_bytes + 2)
    layers = [layer()]
    layers += [tuple(x.clone() for x in layers[0]) for _ in range(copies(held) - 1)]
    out = (torch.empty(1, HQ, 1, D), torch.empty(1, HQ, 1))

    def kernel(i):
        kc, kn, vc, vn = layers[i % len(layers)]
        return cpu.attend_codes(q_rot, kc, kn, vc, vn, ck, cv, bits_k=BK, bits_v=BV, length=T, scale=scale, out=out,
                                arch=arch)

    dense = HKV * T * D * 4 * 2
    kv = [(torch.randn(1, HKV, T, D, generator=gen), torch.randn(1, HKV, T, D, generator=gen))]
    kv += [(k.clone(), v.clone()) for k, v in kv * (copies(dense) - 1)]

    def sdpa(i):
        k, v = kv[i % len(kv)]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def sdpa_rows(i):
        k, v = kv[i % len(kv)]
        o = torch.nn.functional.scaled_dot_product_attention(q.view(1, HKV, HQ // HKV, D), k, v, scale=scale)
        return o.view(1, HQ, 1, D)

    store = LayerStore(CacheConfig(bits_k=BK, bits_v=BV), layer=0, head_dim=D)
    store.update(*kv[0])
    view = store.update(torch.randn(1, HKV, 1, D, generator=gen), torch.randn(1, HKV, 1, D, generator=gen))
    # name -> (fn(round), bytes read per call, hot: run once untimed right before the timed call so
    # that the layer is in cache whatever the interleaved methods evicted)
    return {
        "kernel": (lambda i: kernel(0), held, True),
        "kernel, cold": (kernel, held, False),
        "View, kernel": (lambda i: view.attend(q, scale, kernel=True), None, True),
        "View, torch": (lambda i: view.attend(q, scale, kernel=False), None, True),
        "SDPA fp32": (lambda i: sdpa(0), dense, True),
        "SDPA fp32, cold": (sdpa, dense, False),
        "SDPA fp32, rows": (lambda i: sdpa_rows(0), dense, True),
    }, {"kernel copies": len(layers), "SDPA copies": len(kv)}


def time_all(fns: dict, rounds: int, warmup: int = 3) -> dict:
    for fn, _, _ in fns.values():
        for i in range(warmup):
            fn(i)
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name, (fn, _, hot) in fns.items():
                if hot:
                    fn(r)
                t0 = time.perf_counter()
                fn(r)
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--arch", default=cpu.ARCH_NATIVE,
                    help="-march of the kernel build timed in the kernel columns (e.g. x86-64-v3 for AVX2); "
                         "View, kernel always uses the native build")
    args = ap.parse_args(argv)
    if args.rounds < 20:
        ap.error("--rounds must be >= 20")

    ok, why = cpu.available()
    if not ok:
        sys.exit(f"CPU kernel unavailable: {why}")
    if args.arch != cpu.ARCH_NATIVE:
        kern = cpu.load(args.arch)
        why += f"; kernel columns: -march={args.arch} build ({kern.isa})"
    head = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "kernel": why,
            "load_before": os.getloadavg(), "rounds": args.rounds, "arch": args.arch}
    print(f"# {head['cpu']}, {head['cores']} cores, torch {head['torch']}; {why}")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in head['load_before'])}")
    gen = torch.Generator().manual_seed(0)
    old_threads = torch.get_num_threads()
    rows = []
    try:
        for T in sorted(args.lengths, reverse=True):  # largest first: first touch of fresh memory is slow
            fns, info = build(T, gen, args.arch)
            for n in args.threads:
                torch.set_num_threads(n)
                med = time_all(fns, args.rounds)
                rows.append({"T": T, "threads": n, **info,
                             **{name: med[name] * 1e3 for name in fns},
                             **{f"{name} GB/s": fns[name][1] / med[name] / 1e9 for name in fns if fns[name][1]}})
                print(f"#   T={T} threads={n} done, load {os.getloadavg()[0]:.2f}", flush=True)
            del fns
            gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    head["load_after"] = os.getloadavg()
    names = ["kernel", "kernel, cold", "View, kernel", "View, torch", "SDPA fp32", "SDPA fp32, cold",
             "SDPA fp32, rows"]
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in head['load_after'])}")
    print()
    print("| T | threads | " + " | ".join(f"{n} (ms)" for n in names)
          + " | SDPA / kernel | SDPA rows / kernel | kernel GB/s | SDPA GB/s |")
    print("|---:|---:|" + "---:|" * (len(names) + 4))
    for r in sorted(rows, key=lambda r: (r["threads"], r["T"])):
        cells = " | ".join(f"{r[n]:.2f}" for n in names)
        print(f"| {r['T']} | {r['threads']} | {cells} | {r['SDPA fp32'] / r['kernel']:.1f}x | "
              f"{r['SDPA fp32, rows'] / r['kernel']:.1f}x | {r['kernel GB/s']:.1f} | {r['SDPA fp32 GB/s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
