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

from tq_core.config import CacheConfig


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


def logprobs(host, m, ids, config: CacheConfig | None, protocol: Protocol, *, fork_from=None,
             return_cache: bool = False):
    """Log-probabilities of the next token at each position, (tokens - 1, vocab) float32.

    ``host`` is the backend's host (``harness.hosts.get``), ``m`` its loaded model. ``config=None``
    scores with the host library's uncompressed cache (the baseline).

    Keyword-only options (none of them changes what is measured):

    return_cache: return ``(logprobs, cache)``; the cache then holds the ``tokens - 1`` fed
        tokens (see :func:`held_bytes`).
    fork_from: the ``(logprobs, cache)`` of the *baseline* scored with ``return_cache=True`` on
        the same ids and protocol. Until a token leaves the window nothing is encoded, so a
        compressed cache computes what the uncompressed one did (same keys and values, in the same
        order; up to float rounding where its attention reads a View instead of sdpa, measured
        <= 5e-7 in log-probs): those positions are taken from the baseline,
        its keys/values of the first ``F`` tokens are written into the compressed cache, and
        scoring continues from token ``F`` (``F`` = sinks + window, rounded down to a chunk
        boundary). With the default 4 + 128 this skips 132 of 511 decode steps at 512 tokens.
        Ignored in simulated mode, when nothing can be skipped, and for a model that does not
        compute in 16 bits (its sinks and window are held in 16 bits: not the baseline's numbers).

    The compressed cache is sized for the fed tokens up front (``reserve``), so what it holds at
    the end is exactly what those tokens need.
    """
    ids = [int(i) for i in ids[: protocol.tokens]]
    if len(ids) < protocol.tokens:
        raise ValueError(f"text has {len(ids)} tokens, protocol needs {protocol.tokens}")
    if fork_from is not None:
        fork_from = _check_fork(fork_from, len(ids))
    fed = len(ids) - 1
    simulate = protocol.mode == "simulated"
    out, start = [], 0
    # Forking is exact only where the cache holds sinks and window as the model computes them (a
    # 16-bit model): a float32 model's are held in 16 bits, so its first positions differ already.
    f = fork_point(config, protocol, len(ids)) if fork_from is not None and host.holds_window_exactly(m) else 0
    if f:
        base_lp, base_cache = fork_from
        if any(kv is None or kv[0].shape[-2] != fed for kv in host.layer_kv(base_cache)):
            raise ValueError("fork_from cache must be the baseline's, holding every fed token in each layer")
        cache = host.fork(m, base_cache, config, upto=f, reserve=fed)
        out.append(base_lp[:f])
        start = f
    else:
        cache = host.new_cache(m, config, simulate=simulate, reserve=fed)
    for s, e in _chunks(len(ids), protocol.chunk, start):
        out.append(host.log_softmax(host.forward(m, ids[s:e], cache)))  # see log_softmax
    lp = np.concatenate(out, axis=0)
    return (lp, cache) if return_cache else lp


def _chunks(n: int, chunk: int, start: int = 0):
    # Positions 0 .. n-2 are scored (each predicts the next token); the last token is never fed.
    for s in range(start, n - 1, chunk):
        yield s, min(s + chunk, n - 1)


def _check_fork(fork_from, n: int):
    try:
        lp, cache = fork_from
    except (TypeError, ValueError):
        raise TypeError("fork_from must be the (logprobs, cache) of a baseline scored with return_cache=True") from None
    if not isinstance(lp, np.ndarray) or lp.ndim != 2 or lp.shape[0] != n - 1:
        raise ValueError(f"fork_from log-probs must be ({n - 1}, vocab) for these {n} ids, "
                         f"got {getattr(lp, 'shape', type(lp).__name__)}")
    return lp, cache


def fork_point(config: CacheConfig | None, protocol: Protocol, tokens: int | None = None) -> int:
    """Tokens a compressed scoring can take from the baseline: nothing is encoded before them.

    Feeding token ``t`` spills a token out of the window only once ``t >= sinks + window``; the
    chunk that starts there still reads full precision only, but the next one does not. So the
    first ``sinks + window`` positions (rounded down to a chunk boundary) are the baseline's.
    """
    if config is None or protocol.mode != "cache":
        return 0
    from tq_core import methods

    if methods.get(config.method).peer:
        # Another project's cache quantizes on its own schedule (transformers' QuantizedCache quantizes
        # all of its first call, mlx-lm's from the first token): no position is the baseline's.
        return 0
    fed = (protocol.tokens if tokens is None else tokens) - 1
    f = min(config.sinks + config.window, fed)
    return (f // protocol.chunk) * protocol.chunk


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probs normalized in float64.

    Both backends normalize in float64 so their scorings differ only by the model's arithmetic:
    mlx's float32 ``logits - logsumexp(logits)`` on CPU (mlx 0.32) leaves rows under-normalized by
    ~1.3e-4 nats (max 2.3e-4; torch's float32 log_softmax: ~1e-5), which alone moved the mlx
    baseline PPL by -0.013 % against torch.
    """
    return _renormalized(logits).astype(np.float32)


def held_bytes(host, cache) -> dict:
    """What a scoring's cache holds at the end, measured from its arrays.

    Returns bytes by part (the method's fields, e.g. ``codes`` and ``norms``, ``spare`` history
    capacity, ``sinks``, ``window``, ``other`` of compressed layers; ``uncompressed`` for the host
    library's own layers, the whole baseline cache included), their ``total``, the ``tokens`` held,
    ``channels`` (K plus V channels per token, summed over layers and KV heads) and
    ``bits_per_channel`` = total * 8 / (tokens * channels). mlx-lm's own ``KVCache`` allocates in
    steps of 256 tokens; its bytes are the allocation (what is held). A peer's cache (another
    project's: ``codes``, ``scales``, ``zeros``, ``residual``, from its own tensors) also gives
    ``encoded``, the tokens it holds quantized.
    """
    held = host.held_bytes(cache)
    parts, tokens, channels = held["parts"], held["tokens"], held["channels"]
    total = sum(parts.values())
    bpc = total * 8 / (tokens * channels) if tokens and channels else float("nan")
    out = {**parts, "total": total, "tokens": tokens, "channels": channels, "bits_per_channel": bpc}
    if "encoded" in held:  # a peer's cache: tokens it holds quantized, counted from its tensors
        out["encoded"] = held["encoded"]
    return out


def perplexity(lp: np.ndarray, ids) -> dict:
    """PPL ± SE of one scoring. The SE treats token NLLs as independent (they are not quite)."""
    nll = _nll(lp, ids)
    mean, se = nll.mean(), nll.std(ddof=1) / math.sqrt(len(nll))
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_se": ppl * se, "nll": float(mean), "tokens": int(len(nll))}


def _nll(lp, ids):
    t = np.asarray(ids[1: len(lp) + 1])
    return -lp[np.arange(len(lp)), t].astype(np.float64)


_ROWS = 64


def _renormalized(lp: np.ndarray) -> np.ndarray:
    """float64 log-probs that sum to 1 in float64.

    float32 log-softmax leaves each row normalized only to ~1e-7; a row-constant offset c between
    two scorings adds c to their KLD at first order, while the KLD of two nearly equal
    distributions is second order (~1e-9 for two backends' rounding). Without this, near-identical
    scorings read as exactly 0 (clamped) or as their normalization error.
    """
    x = lp.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


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
    kld = np.empty(n)
    for s in range(0, n, _ROWS):  # float64 in blocks of rows: a 1024 x 49152 text needs no 400 MB temporaries
        b64 = _renormalized(base[s:s + _ROWS])
        kld[s:s + _ROWS] = np.sum(np.exp(b64) * (b64 - _renormalized(test[s:s + _ROWS])), axis=-1)
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
