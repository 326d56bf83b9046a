"""Synthetic results files in the schema ``reports.collect`` writes, with every suite's metrics.

For tests that need planted history (regressions, recoveries, trends over commits) and to preview a
full page without running the suites:

    python -m reports.synthetic OUT_DIR [--runs 3]   # then: tq report --results OUT_DIR

Metric names, units, test ids and labels follow what the suites record; every metric is checked
against ``reports.registry`` as it is generated (name registered, unit the registered one), so
this file cannot drift from the suites unnoticed. The numbers are made up (seeded, plausible
magnitudes); nothing here is a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random

from . import registry

CONFIGS = {"K4V2+s4w128": (4, 2), "K3V2+s4w128": (3, 2), "K4V3+s4w128": (4, 3), "K2V2+s4w128": (2, 2)}
LAYERS = 30
BACKEND = "torch-cpu"


def results(*, commit: str = "a" * 40, started: str = "2026-11-01T02:00:00+00:00", commit_time: str | None = None,
            target: str = "cpu", corpus_sha: str = "c" * 64, model: str = "smollm2-135m", kld_scale: float = 1.0,
            speed_scale: float = 1.0, seed: int = 0, fail: bool = False, note: str | None = None,
            speed_spread: float = 0.01, tier: str = "default") -> dict:
    """One run's results file content. ``kld_scale``/``speed_scale`` plant regressions or improvements;
    ``note`` is added as a label to every perplexity record (and as the compressed generation text);
    ``speed_spread``: half the range of the timed rounds over their median, written as each speed test's
    ``timings``."""
    rnd = random.Random(seed)
    recs: list[dict] = []
    tests: dict[str, str] = {}

    def rec(suite, test, metric, value, unit=None, error=None, **labels):
        unit = registry.unit_of(metric, unit)  # raises on a name or unit the suites do not record
        node = f"suites/test_{suite}.py::{test}"
        recs.append({"suite": suite, "test": node, "metric": metric, "value": float(value), "unit": unit,
                     "error": None if error is None else float(error), "labels": {"backend": BACKEND, **labels}})
        tests.setdefault(node, "passed")

    # memory: bytes held by the layout, the fp16 cache measured beside it
    for name, layers, heads, dim in (("smollm2-135m", 30, 3, 64), ("llama3-8b-shape", 32, 8, 128)):
        for ctx in (1024, 4096):
            for variant, config, fp_tok in (("default", "K4V2+s4w128", 132), ("plain", "K4V2+s0w0", 0)):
                per_vec = dim * 6 // 8 + 4
                held = layers * heads * ((ctx - fp_tok) * per_vec + fp_tok * dim * 4)
                fp16 = layers * heads * dim * 4 * ctx
                lab = dict(config=config, model=name, context=ctx, spec=name, variant=variant)
                t = f"test_bytes_held[context={ctx}-model={name}-backend={BACKEND}-variant={variant}]"
                rec("memory", t, "bytes_held", held, "B", **lab)
                rec("memory", t, "bytes_formula", held, "B", **lab)
                rec("memory", t, "bytes_fp16_cache", fp16, "B", **lab)
                rec("memory", t, "ratio_vs_fp16", held / fp16, "x", **lab)
                rec("memory", t, "bytes_per_token_per_head", held / (ctx * layers * heads), "B", **lab)
                rec("memory", t, "bits_per_channel", held * 8 / (ctx * layers * heads * dim * 2), "bit", **lab)

    # mse: random unit vectors vs the optimum and 4^-b; real K/V per layer
    paper = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
    for dim in (64, 128):
        for bits in (1, 2, 3, 4):
            opt = min(0.3634, 2.72 * 4.0 ** -bits) * (1 + 0.3 / dim)
            t = f"test_random_unit_vectors[dim={dim}-bits={bits}-backend={BACKEND}]"
            lab = dict(dim=dim, bits=bits)
            rec("mse", t, "d_mse_optimum", opt, **lab)
            rec("mse", t, "shannon_lower_bound", 4.0 ** -bits, **lab)
            rec("mse", t, "d_mse_paper", paper[bits], **lab)
            rec("mse", t, "optimum_vs_paper", opt / paper[bits], "x", **lab)
            for nc in (False, True):
                d = opt * (1.001 if not nc else 0.93)
                rec("mse", t, "d_mse", d, error=d * 0.004, norm_correction=nc, **lab)
                rec("mse", t, "d_mse_vs_optimum", d / opt, "x", error=0.004, norm_correction=nc, **lab)
                rec("mse", t, "d_mse_vs_shannon", d * 4.0 ** bits, "x", error=0.004, norm_correction=nc, **lab)
                rec("mse", t, "ip_shrink", 1 - d if not nc else 1 - d / 2, "x", error=0.002, norm_correction=nc,
                    **lab)
                rec("mse", t, "ip_spread", math.sqrt(d), "rms<q,x>", error=0.002, norm_correction=nc, **lab)
            rec("mse", t, "d_mse_nc_on_vs_off", 0.93 / 1.001, "x", **lab)
    for kind, bits in (("k", 4), ("v", 2)):
        for nc in (False, True):
            t = f"test_real_kv[backend={BACKEND}-norm_correction={nc}]"
            for layer in range(LAYERS):
                r = 1 + 0.08 * math.sin(layer / 3) + rnd.uniform(-0.02, 0.02)
                rec("mse", t, "real_d_mse_unit_vs_reference", r, "x", error=0.01, kind=kind, bits=bits,
                    layer=layer, norm_correction=nc)
            rec("mse", t, "real_d_mse_unit_vs_reference_mean", 1.0, "x", error=0.01, kind=kind, bits=bits,
                norm_correction=nc)

    # attention: per layer, then the mean over layers
    for config, (bk, bv) in CONFIGS.items():
        q = 4.0 ** -((bk + bv) / 2)
        t = f"test_attention_per_layer[backend={BACKEND}-config={config}]"
        per: dict[str, list] = {"cos_mean": [], "cos_min": [], "kl_mean": [], "top8_overlap": [], "rel_err_mean": []}
        for layer in range(LAYERS):
            w = 1 + 0.6 * math.exp(-layer / 4) + rnd.uniform(0, 0.1)
            vals = {"cos_mean": 1 - 0.05 * q * w, "cos_min": 1 - 0.3 * q * w, "kl_mean": 0.2 * q * w,
                    "top8_overlap": 1 - 0.4 * q * w, "rel_err_mean": 0.3 * math.sqrt(q * w)}
            for m, v in vals.items():
                rec("attention", t, f"attn_{m}", v, layer=layer, config=config, queries=256)
                per[m].append(v)
        for m, vs in per.items():
            mean = sum(vs) / len(vs)
            se = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1) / len(vs))
            rec("attention", t, f"attn_{m}_layers_mean", mean, error=se, config=config, queries=256)
        rec("attention", t, "attn_cos_min_layers_min", min(per["cos_min"]), config=config, queries=256)

    # perplexity: the quality-per-bit frontier, decode semantics through the cache
    for config, (bk, bv) in CONFIGS.items():
        q = 4.0 ** -((bk + bv) / 2)
        kld = 0.16 * q * 16 * kld_scale
        lab = dict(config=config, mode="cache", chunk=1, tokens=512, sinks=4, window=128,
                   baseline="uncompressed cache, same run", model=model, **({"note": note} if note else {}))
        t = f"test_perplexity[backend={BACKEND}-config={config}]"
        base = 17.54
        dppl = 100 * kld * 1.3
        rec("perplexity", t, "ppl", base * (1 + dppl / 100), error=2.2, **lab)
        rec("perplexity", t, "ppl_base", base, error=2.2, **lab)
        rec("perplexity", t, "dppl_pct", dppl, "%", error=0.2 + dppl * 0.3, **lab)
        rec("perplexity", t, "kld_mean", kld, "nats", error=kld * 0.08, **lab)
        rec("perplexity", t, "kld_median", kld * 0.3, "nats", **lab)
        rec("perplexity", t, "kld_p99", kld * 9, "nats", **lab)
        rec("perplexity", t, "kld_p999", kld * 20, "nats", **lab)
        rec("perplexity", t, "kld_max", kld * 40, "nats", **lab)
        rec("perplexity", t, "same_top1_pct", 100 * (1 - 0.5 * math.sqrt(kld)), "%", error=0.7, **lab)
        rec("perplexity", t, "bits_per_channel", (bk + bv) / 2 + 0.5 + 0.3, "bit", **lab)
        rec("perplexity", t, "tokens_held", 511, "token", **lab)
        if config == "K4V2+s4w128":
            rec("perplexity", t, "goal_met", float(kld < 0.02), "bool", goal="dppl_pct <= 1.0 and kld_mean <= 0.02",
                **lab)

    # generation: match rate and the texts at the first divergence
    for config, (bk, bv) in CONFIGS.items():
        first = 6 * (bk + bv)
        t = f"test_parity[backend={BACKEND}-config={config}-prompt=sky]"
        lab = dict(config=config, prompt="sky")
        texts = {} if first >= 48 else dict(
            text_base="The sky is blue because molecules scatter short wavelengths more strongly.",
            text_tq=note or "The sky is blue because the molecules of air scatter blue light more.")
        rec("generation", t, "match_rate", min(1.0, first / 48), "", **lab, **texts)
        rec("generation", t, "first_divergence", first, "token", diverged=first < 48, **lab)
        rec("generation", t, "cache_bytes", 30 * 3 * (first + 40) * 52, "B", **lab)
        rec("generation", f"test_parity_summary[backend={BACKEND}-config={config}]", "match_rate_mean",
            min(1.0, first / 48), "", config=config, prompts=1)

    # needle: length x depth, the uncompressed cache and a compressed one
    for length in (512, 1024, 2048):
        for depth in (0, 50, 100):
            t = f"test_needle[backend={BACKEND}-length={length}-depth={depth}]"
            for name, config in (("baseline", "baseline"), ("K4V2", "K4V2+s4w128")):
                found = 1.0 if name == "baseline" else float(rnd.random() > 0.1 * (length / 512 - 1) * depth / 50)
                rec("needle", t, "passkey_found", found, "", config_name=name, config=config, length=length,
                    depth=depth)

    # speed: codec throughput vs bits, prefill/decode vs the baseline
    for bits in (2, 3, 4):
        for op, rate in (("encode", 4.0e6), ("decode", 6.0e6)):
            v = rate / (1 + 0.15 * bits) * speed_scale
            t = f"test_codec_throughput[d=128-bits={bits}-backend={BACKEND}-op={op}]"
            lab = dict(d=128, bits=bits, op=op, dtype="float32", vectors=4096, threads=1)
            rec("speed", t, "vectors_per_s", v, "vec/s", **lab)
            rec("speed", t, "gb_per_s", v * 128 * 4 / 1e9, "GB/s", **lab)
            rec("speed", t, "host_load_1m", 1.2, "procs", d=128, bits=bits, op=op)
    t = f"test_model_tokens_per_s[backend={BACKEND}]"
    lab = dict(model=model, prompt=256, new_tokens=32, threads=1)
    for cache, slow in (("baseline", 1.0), ("K4V2+s4w128", 0.8)):
        rec("speed", t, "prefill_tokens_per_s", 2400 * slow * speed_scale, "tok/s", cache=cache, **lab)
        rec("speed", t, "decode_tokens_per_s", 42 * slow * speed_scale, "tok/s", cache=cache, **lab)
    for phase in ("prefill", "decode"):
        rec("speed", t, "speed_ratio", 0.8, "x", phase=phase, config="K4V2+s4w128", **lab)

    timings = {}
    for node in tests:
        if node.startswith("suites/test_speed.py"):
            med = 0.01 / speed_scale  # seconds per round: the rates above scale with 1 / time
            half = speed_spread * med  # half the range of the rounds
            timings[node] = {"rounds": 9, "min": med - half, "q1": med - half / 3, "median": med, "q3": med + half / 3,
                             "max": med + half, "stddev": half / 2}
    if fail:
        tests[f"suites/test_perplexity.py::test_perplexity[backend={BACKEND}-config=K2V2+s4w128]"] = "failed"
    tests["suites/test_memory.py::test_bytes_held[context=1024-model=smollm2-135m-backend=torch-cuda-variant=default]"] = \
        "skipped"
    run = {"target": target, "tier": tier, "started": started, "commit": commit,
           "commit_time": commit_time or started, "dirty": False, "model": model, "seed": 0,
           "weights_sha256": "f" * 64, "backends": [BACKEND],
           "skipped_backends": {"torch-cuda": "torch-cuda: no CUDA device"},
           "corpus": {"source": "synthetic", "sha256": corpus_sha, "chars": 465126},
           "versions": {"tq-core": "0.1.0", "numpy": "2.4.6", "torch": "2.13.0+cpu"},
           "machine": {"cpu": "synthetic CPU", "cpu_count": 2, "os": "Linux", "python": "3.11.7"},
           "exitstatus": 1 if fail else 0}
    return {"schema": 1, "run": run, "records": recs, "tests": tests, "timings": timings}


def write(folder: str | pathlib.Path, **kw) -> pathlib.Path:
    """Write one synthetic run into ``folder/<target>/`` under the name ``reports.collect`` would use."""
    data = results(**kw)
    run = data["run"]
    out = pathlib.Path(folder) / run["target"]
    out.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "")[:15]
    path = out / f"{stamp}_{run['commit'][:10]}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    for i in range(args.runs):
        day = f"2026-11-{i + 1:02d}T02:00:00+00:00"
        for target in ("cpu", "mlx"):
            print(write(args.out, commit=f"{i:x}" * 40, started=day, target=target, seed=i,
                        kld_scale=1.5 if i >= args.runs - 1 and target == "cpu" else 1.0,
                        speed_scale=1 - 0.01 * i))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
