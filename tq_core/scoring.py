"""Score text *through a cache*, and compare two scorings the way llama.cpp's KL-divergence mode does.

A single forward pass over a text attends to the keys and values of that same pass: it never
reads a compressed cache. Here the text is fed in chunks of ``chunk`` tokens; each chunk attends
to the history as the cache holds it and to itself in full precision. ``chunk=1`` is decode
semantics (every scored token sees the compressed history and itself, as in generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import CacheConfig


@dataclass(frozen=True)
class Protocol:
    """How a text is scored: ``tokens`` scored ids, fed ``chunk`` at a time through the cache."""

    tokens: int = 512
    chunk: int = 1
    mode: str = "cache"  # "cache": through the stored history; "simulated": every K/V quantized first

    def __post_init__(self):
        for name in ("tokens", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.mode not in ("cache", "simulated"):
            raise ValueError(f"mode must be 'cache' or 'simulated', got {self.mode!r}")

    def describe(self) -> str:
        sem = "decode semantics" if self.chunk == 1 else f"chunks of {self.chunk} (full-precision within a chunk)"
        return f"{self.tokens} tokens, {sem}, mode={self.mode}"


def logprobs(model, ids, config: CacheConfig | None, backend: str, protocol: Protocol) -> np.ndarray:
    """Log-probabilities of the next token at each position, (tokens - 1, vocab) float32.

    ``config=None`` scores with the host library's uncompressed cache (the baseline).
    """
    ids = [int(i) for i in ids[: protocol.tokens]]
    if len(ids) < protocol.tokens:
        raise ValueError(f"text has {len(ids)} tokens, protocol needs {protocol.tokens}")
    if backend == "torch":
        return _logprobs_torch(model, ids, config, protocol)
    if backend == "mlx":
        return _logprobs_mlx(model, ids, config, protocol)
    raise ValueError(f"backend must be 'torch' or 'mlx', got {backend!r}")


def _chunks(n: int, chunk: int):
    # Positions 0 .. n-2 are scored (each predicts the next token); the last token is never fed.
    for s in range(0, n - 1, chunk):
        yield s, min(s + chunk, n - 1)


def _logprobs_torch(model, ids, config, protocol):
    import torch

    from .integrations import hf

    simulate = protocol.mode == "simulated"
    cache = hf.dynamic_cache(model) if config is None else hf.make_cache(model, config, simulate)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = []
    with torch.no_grad():
        for s, e in _chunks(len(ids), protocol.chunk):
            logits = model(input_ids=x[:, s:e], use_cache=True, **{hf.cache_kwarg(model): cache}).logits
            out.append(torch.log_softmax(logits[0].float(), dim=-1).cpu().numpy())
    return np.concatenate(out, axis=0)


def _logprobs_mlx(model, ids, config, protocol):
    import mlx.core as mx

    from .integrations import mlx_lm

    simulate = protocol.mode == "simulated"
    cache = mlx_lm.baseline_cache(model) if config is None else mlx_lm.make_cache(model, config, simulate)
    x = mx.array([ids])
    out = []
    for s, e in _chunks(len(ids), protocol.chunk):
        logits = model(x[:, s:e], cache=cache)[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(np.array(lp))
    return np.concatenate(out, axis=0)


def perplexity(lp: np.ndarray, ids) -> dict:
    """PPL ± SE of one scoring. The SE treats token NLLs as independent (they are not quite)."""
    nll = _nll(lp, ids)
    mean, se = nll.mean(), nll.std(ddof=1) / math.sqrt(len(nll))
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_se": ppl * se, "nll": float(mean), "tokens": int(len(nll))}


def _nll(lp, ids):
    t = np.asarray(ids[1: len(lp) + 1])
    return -lp[np.arange(len(lp)), t].astype(np.float64)


def compare(base: np.ndarray, test: np.ndarray, ids) -> dict:
    """KL-divergence block of ``test`` against ``base`` (both (n, vocab) log-probs of one text).

    Returns PPL of each with SE, the PPL ratio and ΔPPL % with a paired SE, KLD mean ± SE, median,
    p99, p99.9 and max, same-top-1 % ± binomial SE, and RMS Δp of the correct token (in %).
    """
    if base.shape != test.shape:
        raise ValueError(f"base and test must have the same shape, got {base.shape} and {test.shape}")
    n = len(base)
    nb, nt = _nll(base, ids), _nll(test, ids)
    diff = nt - nb
    ratio = math.exp(diff.mean())
    ratio_se = ratio * diff.std(ddof=1) / math.sqrt(n)
    b64 = base.astype(np.float64)
    kld = np.sum(np.exp(b64) * (b64 - test.astype(np.float64)), axis=-1)
    kld = np.maximum(kld, 0.0)  # rounding can give -1e-12
    top = (base.argmax(-1) == test.argmax(-1)).astype(np.float64)
    p_top = top.mean()
    dp = np.exp(-nt) - np.exp(-nb)
    pb, pt = perplexity(base, ids), perplexity(test, ids)
    return {
        "tokens": n,
        "ppl_base": pb["ppl"], "ppl_base_se": pb["ppl_se"],
        "ppl": pt["ppl"], "ppl_se": pt["ppl_se"],
        "ppl_ratio": ratio, "ppl_ratio_se": ratio_se,
        "dppl_pct": (ratio - 1) * 100, "dppl_pct_se": ratio_se * 100,
        "kld_mean": float(kld.mean()), "kld_se": float(kld.std(ddof=1) / math.sqrt(n)),
        "kld_median": float(np.median(kld)), "kld_p99": float(np.quantile(kld, 0.99)),
        "kld_p999": float(np.quantile(kld, 0.999)), "kld_max": float(kld.max()),
        "same_top1_pct": p_top * 100, "same_top1_pct_se": math.sqrt(p_top * (1 - p_top) / n) * 100,
        "rms_dp_pct": float(np.sqrt(np.mean(dp ** 2)) * 100),
    }
