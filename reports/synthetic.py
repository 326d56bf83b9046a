"""Synthetic results files in the schema ``reports.collect`` writes, with every suite's metrics.

For tests of the renderer and the site, and to preview a full page without running the suites:

    python -m reports.synthetic OUT_DIR [--runs 3]   # then: tq report --results OUT_DIR

The numbers are made up (seeded, plausible magnitudes); nothing here is a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random

CONFIGS = {"K4V2+s4w128": (4, 2), "K3V2+s4w128": (3, 2), "K4V3+s4w128": (4, 3), "K2V2+s4w128": (2, 2)}
LAYERS = 30


def results(*, commit: str = "a" * 40, started: str = "2026-11-01T02:00:00+00:00", commit_time: str | None = None,
            target: str = "cpu", corpus_sha: str = "c" * 64, model: str = "smollm2-135m", kld_scale: float = 1.0,
            speed_scale: float = 1.0, seed: int = 0, fail: bool = False, note: str | None = None) -> dict:
    """One run's results file content. ``kld_scale``/``speed_scale`` plant regressions or improvements;
    ``note`` is added as a label to every perplexity record (and as the compressed generation text)."""
    rnd = random.Random(seed)
    recs: list[dict] = []
    tests: dict[str, str] = {}

    def rec(suite, test, metric, value, unit="", error=None, **labels):
        node = f"suites/test_{suite}.py::{test}"
        recs.append({"suite": suite, "test": node, "metric": metric, "value": float(value), "unit": unit,
                     "error": None if error is None else float(error), "labels": {"backend": "torch-cpu", **labels}})
        tests.setdefault(node, "passed")

    # memory: bytes by the layout formula, fp16 baseline
    for name, layers, heads, dim in (("smollm2-135m", 30, 3, 64), ("llama3-8b-shape", 32, 8, 128)):
        for ctx in (1024, 4096, 16384):
            for config, fp_tok in (("K4V2+s4w128", 132), ("K4V2", 0)):
                per_vec = dim * 6 // 8 + 4
                held = layers * heads * ((ctx - fp_tok) * per_vec + fp_tok * dim * 4)
                fp16 = layers * heads * dim * 4 * ctx
                lab = dict(config=config, model=name, context=ctx, variant="plain" if fp_tok == 0 else "default")
                t = f"test_bytes_held[context={ctx}-model={name}-variant={lab['variant']}]"
                rec("memory", t, "bytes_held", held, "B", **lab)
                rec("memory", t, "bytes_formula", held, "B", **lab)
                rec("memory", t, "bytes_fp16_cache", fp16, "B", **lab)
                rec("memory", t, "ratio_vs_fp16", held / fp16, "x", **lab)
                rec("memory", t, "bits_per_channel", held * 8 / (ctx * layers * heads * dim * 2), "bit", **lab)

    # mse: random unit vectors vs the optimum and 4^-b; real K/V per layer
    for dim in (64, 128):
        for bits in (1, 2, 3, 4):
            opt = min(0.3634, 2.72 * 4.0 ** -bits) * (1 + 0.3 / dim)
            t = f"test_random_unit_vectors[dim={dim}-bits={bits}]"
            rec("mse", t, "d_mse_optimum", opt, dim=dim, bits=bits)
            rec("mse", t, "shannon_lower_bound", 4.0 ** -bits, dim=dim, bits=bits)
            for nc in (False, True):
                d = opt * (1.001 if not nc else 0.93)
                rec("mse", t, "d_mse", d, error=d * 0.004, dim=dim, bits=bits, norm_correction=nc)
                rec("mse", t, "d_mse_vs_optimum", d / opt, "x", error=0.004, dim=dim, bits=bits, norm_correction=nc)
                rec("mse", t, "ip_spread", math.sqrt(d), "rms<q,x>", error=0.002, dim=dim, bits=bits,
                    norm_correction=nc)
    for kind, bits in (("k", 4), ("v", 2)):
        for layer in range(LAYERS):
            r = 1 + 0.08 * math.sin(layer / 3) + rnd.uniform(-0.02, 0.02)
            rec("mse", "test_real_kv[norm_correction=True]", "real_d_mse_unit_vs_optimum", r, "x", error=0.01,
                kind=kind, bits=bits, layer=layer, norm_correction=True)

    # attention: per layer and means
    for config, (bk, bv) in CONFIGS.items():
        q = 4.0 ** -((bk + bv) / 2)
        t = f"test_attention[config={config}]"
        cos = []
        for layer in range(LAYERS):
            w = 1 + 0.6 * math.exp(-layer / 4) + rnd.uniform(0, 0.1)
            c = 1 - 0.05 * q * w
            cos.append(c)
            rec("attention", t, "cosine_mean", c, layer=layer, config=config)
            rec("attention", t, "attn_kl", 0.2 * q * w, "nats", layer=layer, config=config)
            rec("attention", t, "topk_overlap", 1 - 0.4 * q * w, layer=layer, config=config)
        rec("attention", t, "cosine_mean", sum(cos) / len(cos), config=config)
        rec("attention", t, "cosine_min", min(cos), config=config)

    # perplexity: the quality-per-bit frontier
    for config, (bk, bv) in CONFIGS.items():
        q = 4.0 ** -((bk + bv) / 2)
        kld = 0.16 * q * 16 * kld_scale
        lab = dict(config=config, mode="decode", chunk=512, tokens=512, sinks=4, window=128,
                   baseline="uncompressed cache, same run", **({"note": note} if note else {}))
        t = f"test_perplexity[config={config}]"
        base = 17.54
        dppl = 100 * kld * 1.3
        rec("perplexity", t, "ppl", base * (1 + dppl / 100), error=2.2, **lab)
        rec("perplexity", t, "ppl_base", base, error=2.2, **lab)
        rec("perplexity", t, "dppl_pct", dppl, "%", error=0.2 + dppl * 0.3, **lab)
        rec("perplexity", t, "kld_mean", kld, "nats", error=kld * 0.08, **lab)
        rec("perplexity", t, "kld_median", kld * 0.3, "nats", **lab)
        rec("perplexity", t, "kld_p99", kld * 9, "nats", **lab)
        rec("perplexity", t, "kld_max", kld * 40, "nats", **lab)
        rec("perplexity", t, "same_top1_pct", 100 * (1 - 0.5 * math.sqrt(kld)), "%", error=0.7, **lab)
        rec("perplexity", t, "bits_per_channel", (bk + bv) / 2 + 0.5 + 0.3, "bit", **lab)
        rec("perplexity", t, "goal_met", float(kld < 0.02), "bool", **lab)

    # generation: match rate and the texts at the first divergence
    for config, (bk, bv) in CONFIGS.items():
        first = 6 * (bk + bv)
        t = f"test_generation[config={config}]"
        lab = dict(config=config, prompt="sky")
        rec("generation", t, "match_rate", min(1.0, first / 48), **lab)
        texts = {} if first >= 48 else dict(
            text_base="The sky is blue because molecules scatter short wavelengths more strongly.",
            text_tq=note or "The sky is blue because the molecules of air scatter blue light more.")
        rec("generation", t, "first_divergence", first, "token", **lab, **texts)
        rec("generation", t, "cache_bytes", 30 * 3 * (first + 40) * 52, "B", **lab)

    # needle: length x depth, baseline and compressed
    for config in ("baseline", "K4V2+s4w128"):
        for length in (1024, 2048, 4096):
            for depth in (0.1, 0.5, 0.9):
                acc = 1.0 if config == "baseline" else max(0.0, 1 - 0.1 * (length / 1024 - 1) * depth)
                rec("needle", f"test_needle[config={config}-length={length}-depth={depth}]", "accuracy", acc,
                    error=0.05, config=config, length=length, depth=depth)

    # speed: codec throughput vs bits, prefill/decode vs the baseline
    for bits in (1, 2, 3, 4):
        for what, rate in (("encode", 4.0e6), ("decode", 6.0e6)):
            v = rate / (1 + 0.15 * bits) * speed_scale
            rec("speed", f"test_codec[bits={bits}]", f"{what}_vectors_per_s", v, "vectors/s", error=v * 0.01,
                bits=bits, dim=128)
    for config in ("baseline", "K4V2+s4w128"):
        slow = 1.0 if config == "baseline" else 0.8
        t = f"test_e2e[config={config}]"
        rec("speed", t, "prefill_tokens_per_s", 2400 * slow * speed_scale, "tokens/s", error=30, config=config)
        rec("speed", t, "decode_tokens_per_s", 42 * slow * speed_scale, "tokens/s", error=0.8, config=config)

    if fail:
        tests["suites/test_perplexity.py::test_perplexity[config=K2V2+s4w128]"] = "failed"
    tests["suites/test_memory.py::test_bytes_held[backend=torch-cuda]"] = "skipped"
    run = {"target": target, "tier": "default", "started": started, "commit": commit,
           "commit_time": commit_time or started, "dirty": False, "model": model, "seed": 0,
           "weights_sha256": "f" * 64, "backends": ["torch-cpu"],
           "skipped_backends": {"torch-cuda": "torch-cuda: no CUDA device"},
           "corpus": {"source": "synthetic", "sha256": corpus_sha, "chars": 465126},
           "versions": {"tq-core": "0.1.0", "numpy": "2.4.6", "torch": "2.13.0+cpu"},
           "machine": {"cpu": "synthetic CPU", "cpu_count": 2, "os": "Linux", "python": "3.11.7"}}
    return {"schema": 1, "run": run, "records": recs, "tests": tests}


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
