"""Every metric the suites record: its unit, which direction is better, and what it means.

One registry for both sides: ``reports.collect``'s ``record`` fixture refuses a metric that is not
here (or a unit that differs from the one here), and the reports read direction, unit and meaning
from here instead of guessing from the name. Adding a measurement to a suite means adding one
``Metric`` below.

Directions:
    higher  more is better (cosine similarity, match rate, tokens/s)
    lower   less is better (KLD, error, bytes held, seconds)
    target  closer to a reference is better; the meaning names the reference (ratios to an optimum,
            ΔPPL of a noise floor, one backend's PPL against another's)
    none    a fact, neither better nor worse (tokens held, a baseline's bytes, host load)

Pure Python, no third-party import: the pytest plugin imports it in every run.
"""

from __future__ import annotations

from dataclasses import dataclass

FILE = "reports/registry.py"
DIRECTIONS = {
    "higher": "higher is better",
    "lower": "lower is better",
    "target": "closer to its reference is better",
    "none": "a fact: neither better nor worse",
}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "" for a plain number
    direction: str  # one of DIRECTIONS
    meaning: str  # one line

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction {self.direction!r} is not one of {list(DIRECTIONS)}")
        if not self.meaning or "\n" in self.meaning:
            raise ValueError(f"metric {self.name!r}: the meaning must be one non-empty line")

    @property
    def sign(self) -> int:
        """+1 when higher is better, -1 when lower is better, 0 otherwise (target, none)."""
        return {"higher": 1, "lower": -1}.get(self.direction, 0)

    @property
    def better(self) -> str:
        return DIRECTIONS[self.direction]

    @property
    def is_rate(self) -> bool:
        """A throughput of the code under test: per-second unit and higher is better."""
        return self.unit.endswith("/s") and self.direction == "higher"


class UnknownMetric(KeyError):
    """A metric name the registry does not have (``str()`` is the one-line message, unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnitMismatch(ValueError):
    pass


METRICS: dict[str, Metric] = {}


def _add(name: str, unit: str, direction: str, meaning: str) -> None:
    if name in METRICS:
        raise ValueError(f"metric {name!r} is registered twice")
    METRICS[name] = Metric(name, unit, direction, meaning)


def lookup(name: str) -> Metric:
    """The registered metric ``name``; ``UnknownMetric`` (a ``KeyError``) with one clear line otherwise."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise UnknownMetric(f"metric {name!r} is not in {FILE}: add it with its unit, direction and meaning") from None


def get(name) -> Metric | None:
    """The registered metric ``name``, or None (e.g. a name in an old results file)."""
    return METRICS.get(name) if isinstance(name, str) else None


def unit_of(name: str, unit: str | None = None) -> str:
    """The registered unit of ``name``; a ``unit`` given must equal it (``UnitMismatch`` otherwise)."""
    m = lookup(name)
    if unit is not None and unit != m.unit:
        raise UnitMismatch(f"metric {name!r} recorded with unit {unit!r}, registered with {m.unit!r} in {FILE}: "
                           "record it in the registered unit (or change the registry)")
    return m.unit


# ---- memory (suites/test_memory.py; bytes also from perplexity and generation) ------------------
_add("bytes_held", "B", "lower", "bytes the compressed cache holds, summed over its tensors (codes, norms, sinks, window)")
_add("bytes_formula", "B", "none", "bytes the layout says the cache holds: packed codes + fp16 norms per encoded token, "
                                   "sinks and window at full precision (bytes_held must equal it)")
_add("bytes_fp16_cache", "B", "none", "bytes an uncompressed fp16 cache of the same tokens holds, measured from its tensors")
_add("ratio_vs_fp16", "x", "lower", "bytes held / bytes of an fp16 cache of the same tokens")
_add("bytes_per_token_per_head", "B", "lower", "bytes held per token, layer and KV head, K and V together")
_add("bits_per_channel", "bit", "lower", "bits held per cached K/V channel per token, everything counted "
                                         "(codes, norms, full-precision sinks and window)")
_add("peak_alloc", "B", "lower", "peak allocator memory while filling the compressed cache (CUDA, MLX)")
_add("peak_alloc_fp16_cache", "B", "none", "peak allocator memory while filling the uncompressed fp16 cache")

# ---- mse (suites/test_mse.py) ----------------------------------------------------------------------
_add("d_mse_optimum", "", "none", "exact Lloyd-Max optimum of D_mse for this dim and bits (the codebook's own error)")
_add("shannon_lower_bound", "", "none", "Shannon lower bound on D_mse at b bits per coordinate: 4^-b")
_add("d_mse_paper", "", "none", "D_mse the TurboQuant paper reports for b = 1..4 (rounded, d → ∞)")
_add("optimum_vs_paper", "x", "none", "Lloyd-Max optimum at this dim / the paper's rounded value")
_add("d_mse", "", "lower", "E‖x − x̂‖² of uniform unit vectors after encode/decode (± SE)")
_add("d_mse_vs_optimum", "x", "target", "d_mse / the Lloyd-Max optimum: 1 is the design point "
                                        "(norm correction on sits below it by design)")
_add("d_mse_vs_shannon", "x", "lower", "d_mse / the Shannon bound 4^-b: distance from the information-theoretic floor")
_add("d_mse_vs_paper", "x", "target", "d_mse / the paper's D_mse for these bits (1 = as published)")
_add("ip_shrink", "x", "target", "slope of ⟨q, x̂⟩ on ⟨q, x⟩, the multiplicative inner-product bias: 1 = unbiased "
                                 "(theory: expected_ip_shrink)")
_add("ip_rel_bias", "", "target", "ip_shrink − 1: relative inner-product bias, 0 = unbiased")
_add("ip_spread", "rms<q,x>", "lower", "std of ⟨q, x̂⟩ − ⟨q, x⟩ in units of rms ⟨q, x⟩ (theory: √D_mse)")
_add("ip_spread_debiased", "rms<q,x>", "lower", "ip_spread after removing the multiplicative bias (ip_shrink)")
_add("ip_spread2_vs_d_mse", "x", "target", "ip_spread² / d_mse: 1 when the inner-product error is what D_mse predicts")
_add("d_mse_nc_identity", "", "target", "D_mse of the uncorrected decode rescaled to unit norm (fp16 scale): "
                                        "must equal d_mse with norm correction on")
_add("d_mse_nc_on_vs_off", "x", "lower", "d_mse with norm correction / without, same vectors and codes "
                                         "(< 1: the correction helps)")
_add("expected_ip_shrink", "x", "none", "the ip_shrink theory expects: 1 − D_mse (norm correction off), "
                                        "1 − D_on/2 (on)")
_add("uniform_reference_d_mse", "", "none", "D_mse the same codec reaches on uniform unit vectors: "
                                            "the reference for the real K/V ratios")
_add("real_d_mse_unit", "", "lower", "D_mse of the model's own K or V, unit-normalized, through that layer's "
                                     "cache quantizer")
_add("real_d_mse_unit_vs_optimum", "x", "target", "real_d_mse_unit / the Lloyd-Max optimum (1 = as on uniform vectors)")
_add("real_d_mse_unit_vs_reference", "x", "target", "real_d_mse_unit / uniform_reference_d_mse "
                                                    "(1 = as on uniform vectors)")
_add("real_rel_mse_raw", "", "lower", "mean ‖x − x̂‖² / ‖x‖² of the model's raw K or V")
_add("real_rel_mse_raw_vs_reference", "x", "target", "real_rel_mse_raw / uniform_reference_d_mse")
_add("real_energy_rel_mse_raw", "", "lower", "Σ‖x − x̂‖² / Σ‖x‖² over a layer's raw K or V (energy-weighted error)")
_add("real_d_mse_unit_vs_reference_mean", "x", "target", "real_d_mse_unit_vs_reference averaged over layers "
                                                         "(± SE over layers)")
_add("real_d_mse_unit_vs_reference_min", "x", "target", "lowest real_d_mse_unit_vs_reference over layers")
_add("real_d_mse_unit_vs_reference_max", "x", "target", "highest real_d_mse_unit_vs_reference over layers")

# ---- attention (suites/test_attention.py): attn_<m>, attn_<m>_layers_mean, attn_<m>_nc_on_minus_off
ATTENTION = {  # m: (unit, direction, meaning)
    "cos_mean": ("", "higher", "cosine similarity of the attention output, compressed vs uncompressed cache, "
                               "mean over query rows and heads"),
    "cos_min": ("", "higher", "cosine similarity of the attention output, compressed vs uncompressed cache, "
                              "lowest over query rows and heads"),
    "kl_mean": ("nats", "lower", "KL(p_base ‖ p_cache) of the attention weights, mean over query rows and heads"),
    "top8_overlap": ("", "higher", "fraction of the 8 highest-scored keys shared with the uncompressed attention, mean"),
    "rel_err_mean": ("", "lower", "‖o_cache − o_base‖ / ‖o_base‖ of the attention output, mean over query rows and heads"),
}
for _m, (_unit, _dir, _meaning) in ATTENTION.items():
    _add(f"attn_{_m}", _unit, _dir, f"{_meaning}; per layer")
    _add(f"attn_{_m}_layers_mean", _unit, _dir, f"{_meaning}; mean over layers (± SE over layers)")
    _add(f"attn_{_m}_nc_on_minus_off", _unit, _dir,
         f"attn_{_m} with norm correction on minus off (plain K4/V2), mean over layers "
         f"({'> 0' if _dir == 'higher' else '< 0'}: the correction helps)")
_add("attn_cos_min_layers_min", "", "higher", "attn_cos_min over every layer: the worst query row of the worst layer")
for _m in ("kl_mean", "cos_mean", "top8_overlap", "rel_err_mean"):
    _add(f"layers_nc_on_better_{_m}", "layers", "higher",
         f"layers where norm correction on gives a better attn_{_m} than off (plain K4/V2)")

# ---- perplexity (suites/test_perplexity.py) ----------------------------------------------------------
_add("ppl", "", "lower", "perplexity through the compressed cache (± SE)")
_add("ppl_base", "", "none", "perplexity through the uncompressed cache, same tokens and protocol: the baseline")
_add("dppl_pct", "%", "lower", "ppl / ppl_base − 1 in percent (± SE of the paired ratio)")
_add("kld_mean", "nats", "lower", "mean KL(p_base ‖ p_cache) of the next-token distributions (± SE)")
_add("kld_median", "nats", "lower", "median per-token KL(p_base ‖ p_cache)")
_add("kld_p99", "nats", "lower", "99th percentile of the per-token KL(p_base ‖ p_cache)")
_add("kld_p999", "nats", "lower", "99.9th percentile of the per-token KL(p_base ‖ p_cache)")
_add("kld_max", "nats", "lower", "largest per-token KL(p_base ‖ p_cache)")
_add("same_top1_pct", "%", "higher", "positions whose top-1 token equals the baseline's, percent (± binomial SE)")
_add("rms_dp_pct", "%", "lower", "RMS change of the probability of the correct next token, percentage points")
_add("positions_scored", "token", "none", "next-token positions scored")
_add("bits_per_channel_codes", "bit", "lower", "bits per channel of the encoded tokens alone: codes + norms")
for _part, _what in (("codes", "packed codes"), ("norms", "stored norms"), ("sinks", "full-precision attention sinks"),
                     ("window", "full-precision recent window"), ("centers", "per-head key centers (c=1), float32"),
                     ("other", "any other part of the compressed layers")):
    _add(f"bytes_{_part}", "B", "lower", f"bytes the compressed cache holds in its {_what}")
for _part, _what in (("scales", "quantization scales (a peer's cache)"),
                     ("zeros", "quantization zero points, shifts or biases (a peer's cache)"),
                     ("residual", "full-precision residual window not yet quantized (a peer's cache)")):
    _add(f"bytes_{_part}", "B", "lower", f"bytes the cache holds in its {_what}")
_add("bytes_spare", "B", "lower", "bytes of history capacity the compressed cache has allocated but not yet filled")
_add("bytes_uncompressed", "B", "none", "bytes held in layers the cache keeps uncompressed (sliding-window, linear "
                                       "attention)")
_add("bytes_baseline_cache", "B", "none", "bytes the uncompressed cache holds after the same scoring")
_add("bits_per_channel_baseline", "bit", "none", "bits per channel the uncompressed cache holds (its dtype)")
_add("tokens_held", "token", "none", "tokens the cache holds at the end of scoring")
_add("tokens_encoded", "token", "none", "tokens held as codes (outside the sinks and the window)")
_add("scoring_seconds", "s", "lower", "wall-clock seconds of the compressed scoring")
_add("scoring_cpu_seconds", "s", "lower", "CPU seconds of the compressed scoring")
_add("goal_met", "bool", "higher", "1 when the project goal in the label goal is met, else 0")
_add("gate_calibrated", "bool", "higher", "1 when the gate (label gate) checked the result against a band measured "
                                          "for this config, protocol and model; 0 when only its model-independent "
                                          "check ran")
_add("kld_vs_cache_mode", "nats", "none", "mean KLD of simulated mode against cache mode, same config and tokens")
_add("max_abs_dlogprob_vs_cache_mode", "nats", "none", "largest |Δ log p| of simulated mode against cache mode "
                                                       "(> 0: the mode took effect)")
_add("noise_kld_mean", "nats", "lower", "mean KLD of the uncompressed cache fed token by token against one forward "
                                        "pass: the float noise floor")
_add("noise_kld_max", "nats", "lower", "largest per-token KLD of the noise-floor comparison (token by token vs one pass)")
_add("noise_dppl_pct", "%", "target", "ΔPPL % of the uncompressed cache token by token vs one pass (0 = no float drift)")
_add("noise_same_top1_pct", "%", "higher", "same top-1 % of the uncompressed cache token by token vs one pass")
_add("noise_max_abs_dlogprob", "nats", "lower", "largest |Δ log p| of the uncompressed cache token by token vs one pass")
_add("cross_ppl", "", "target", "perplexity of one uncompressed forward pass on this backend "
                                "(reference: cross_ppl_reference)")
_add("cross_ppl_reference", "", "none", "perplexity of the same forward pass on the reference backend (torch-cpu)")
_add("cross_dppl_pct", "%", "target", "cross_ppl / cross_ppl_reference − 1 in percent (0 = the backends agree)")
_add("cross_kld_mean", "nats", "lower", "mean KLD of this backend's next-token distributions against the reference "
                                        "backend's")
_add("cross_kld_max", "nats", "lower", "largest per-token KLD against the reference backend")
_add("cross_same_top1_pct", "%", "higher", "positions whose top-1 token equals the reference backend's, percent")
_add("cross_max_abs_dlogprob", "nats", "lower", "largest |Δ log p| against the reference backend")

# ---- generation (suites/test_generation.py) --------------------------------------------------------
_add("match_rate", "", "higher", "fraction of greedy tokens equal to the uncompressed cache's, same prompt")
_add("first_divergence", "token", "higher", "first new token that differs from the baseline's "
                                            "(the number compared when none does)")
_add("new_tokens", "token", "none", "new tokens generated with the compressed cache")
_add("new_tokens_baseline", "token", "none", "new tokens generated with the uncompressed cache")
_add("prompt_tokens", "token", "none", "tokens in the prompt")
_add("cache_bytes", "B", "lower", "bytes the compressed cache holds at the end of generation")
_add("cache_bytes_baseline", "B", "none", "bytes the uncompressed cache holds at the end of generation")
_add("cache_ratio_vs_baseline", "x", "lower", "cache_bytes / cache_bytes_baseline")
_add("match_rate_mean", "", "higher", "match_rate averaged over the tier's prompts")
_add("match_rate_min", "", "higher", "lowest match_rate over the tier's prompts")
_add("first_divergence_mean", "token", "higher", "first_divergence averaged over the tier's prompts")
_add("full_match_fraction", "", "higher", "fraction of prompts whose greedy output equals the baseline's in full")
_add("golden_written", "token", "none", "tokens written into the golden file (TQ_UPDATE_GOLDENS=1)")
_add("golden_match_rate", "", "higher", "fraction of greedy tokens equal to the stored golden output")
_add("golden_first_divergence", "token", "higher", "first new token that differs from the golden "
                                                   "(the golden's length when none does)")

# ---- needle (suites/test_needle.py) -----------------------------------------------------------------
_add("needle_token", "token", "none", "position of the planted needle's first token in the context")
_add("needle_to_question", "token", "none", "tokens between the end of the needle and the question")
_add("passkey_found", "", "higher", "1 when the answer contains the planted key, else 0")
_add("accuracy", "", "higher", "fraction of needle cases whose answer contains the planted key")
_add("retrieved", "case", "higher", "needle cases whose answer contains the planted key")
_add("accuracy_vs_baseline", "", "higher", "accuracy minus the uncompressed cache's on the same cases (0 = as good)")
_add("lost_vs_baseline", "case", "lower", "cases the uncompressed cache retrieved and the compressed cache did not")

# ---- speed (suites/test_speed.py) --------------------------------------------------------------------
_add("host_load_1m", "procs", "none", "1-minute load average of the host after the measurement (marks noisy runs)")
_add("mlx_gemm_gflops", "GFLOP/s", "none", "GEMM rate MLX reaches on this host: which BLAS it runs on")
_add("vectors_per_s", "vec/s", "higher", "vectors the codec alone encodes or decodes per second (label op)")
_add("gb_per_s", "GB/s", "higher", "codec input rate: the float vectors for encode, packed codes + norms for decode")
_add("out_gb_per_s", "GB/s", "higher", "decode output rate: the float vectors written")
_add("prefill_tokens_per_s", "tok/s", "higher", "prompt tokens per second in one prefill call (label cache)")
_add("decode_tokens_per_s", "tok/s", "higher", "tokens per second decoding one token at a time (label cache)")
_add("speed_ratio", "x", "higher", "compressed / baseline tokens per second in the same run (label phase)")
_add("greedy_token_match", "fraction", "higher", "fraction of the timed greedy tokens equal to the baseline's")
_add("step_ms", "ms", "lower", "milliseconds per decode step of all layers, replayed as a CUDA graph (label cache)")
_add("decode_overhead_ms_per_layer", "ms", "lower", "milliseconds per decode step and layer the compressed cache "
                                                    "costs over the baseline")
_add("attention_us", "us", "lower", "one layer's decode attention, one synchronized call (label cache: baseline "
                                   "or the config)")
_add("attention_gpu_us", "us", "lower", "one layer's decode attention, device time of the call replayed as a CUDA graph")
_add("attention_gb_per_s_held", "GB/s", "higher", "bytes the cache holds / time of one layer's decode attention")
_add("attention_speedup", "x", "higher", "baseline attention time / compressed attention time, same tokens (label clock)")
_add("attention_speedup_bound", "x", "none", "baseline bytes / compressed bytes held: the memory-bound limit of the speed-up")
_add("max_context_tokens", "token", "higher", "the most tokens a KV memory budget holds, by allocating them (label cache)")
_add("max_context_ratio", "x", "higher", "compressed / baseline tokens that fit the same KV memory budget")

del _m, _unit, _dir, _meaning, _part, _what
