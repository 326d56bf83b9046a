"""What the reports know about metric names: loose matching, which direction is better, baselines.

Names are matched by regular expression (case-insensitive, from the start), so a suite may add
suffixes (``kld_mean_nats``) without the report losing them; anything unmatched still appears
in its suite's generic table.
"""

from __future__ import annotations

import re

import pandas as pd

HIGHER = re.compile(r"cos|top_?k|top_?\d|overlap|same_|match|accuracy|^acc|found|retriev|first_div|speedup|"
                    r"speed_ratio|throughput|per_s|tok_?s|_tps|gbps|gb_s|vectors_s|goal", re.I)
LOWER = re.compile(r"kld|kl\b|_kl|kl_|mse|err|dppl|rms|bytes|ratio_vs_fp16|bits_per|peak|latency|_ms$|ms_per|"
                   r"seconds|time", re.I)

# What a number is compared against when its record has no ``baseline`` label.
DEFAULT_BASELINE = {
    "memory": "fp16 K/V cache of the same tokens, measured from its tensors",
    "mse": "Lloyd-Max optimum of the coordinate density, Shannon lower bound 4^-b",
    "attention": "attention over the uncompressed cache, same inputs",
    "perplexity": "uncompressed cache, same model, tokens and scoring protocol",
    "generation": "greedy generation with the uncompressed cache",
    "needle": "uncompressed cache, same prompts",
    "speed": "uncompressed cache / fp16 vectors on the same machine",
}


def is_throughput(metric: str, unit: str | None) -> bool:
    """Rates where more is better: tokens/s, vectors/s, GB/s ..."""
    u = (unit or "").strip().lower()
    return u.endswith("/s") or bool(re.search(r"per_s|tok_?s$|_tps|gbps|gb_s|vectors_s|throughput", metric, re.I))


def direction(metric: str, unit: str | None = None) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the name does not say."""
    if is_throughput(metric, unit) or HIGHER.search(metric):
        return 1
    if LOWER.search(metric):
        return -1
    return 0


def match(df: pd.DataFrame, *patterns: str, suite: str | None = None) -> pd.DataFrame:
    """Rows whose metric matches the first pattern (``re.match``, case-insensitive) that matches any."""
    if suite is not None:
        df = df[df["suite"] == suite]
    names = df["metric"].astype(str)
    for p in patterns:
        hit = df[names.str.match(p, case=False)]
        if not hit.empty:
            return hit
    return df.iloc[0:0]


def label(df: pd.DataFrame, *aliases: str) -> str | None:
    """The first of ``aliases`` that is a label column with values in ``df``."""
    for a in aliases:
        if a in df.columns and df[a].notna().any():
            return a
    return None


def config_of(df: pd.DataFrame) -> pd.Series:
    """What each record measured: its ``config`` label, else its ``cache`` label (speed suite), else None."""
    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for col in ("cache", "config"):
        if col in df:
            out = df[col].where(df[col].notna(), out)
    return out


def is_baseline_config(v) -> bool:
    return str(v).lower() in ("baseline", "fp16", "bf16", "none", "uncompressed", "dense")


BASE_SUFFIX = re.compile(r"(_baseline|_base|_fp16|_uncompressed)$|^(baseline|base)_", re.I)


def split_baseline(metric: str) -> tuple[str, bool]:
    """``prefill_tokens_per_s_baseline`` -> (``prefill_tokens_per_s``, True)."""
    stripped = BASE_SUFFIX.sub("", metric)
    return stripped, stripped != metric
