"""Validated configuration of a compressed KV cache."""

from __future__ import annotations

from dataclasses import dataclass


def check_bits(name: str, value) -> int:
    """``value`` if it is an int in 1..8, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in 1..8, got {type(value).__name__} {value!r}")
    if not 1 <= value <= 8:
        raise ValueError(f"{name} must be an int in 1..8, got {value}")
    return value


def check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


@dataclass(frozen=True)
class CacheConfig:
    """How a cache compresses K and V.

    bits_k, bits_v: code bits per channel for keys and values (1..8).
    sinks: the first ``sinks`` positions are kept in full precision (attention sinks).
    window: the most recent ``window`` positions are kept in full precision; older ones are
        encoded once, when they leave the window, and never re-encoded.
    seed: base seed of the per-layer rotations (see ``tq_core.rotation.derive_seed``).
    norm_correction: store ``|x| / |x_hat_unit|`` so decoded vectors keep their norm.

    Why these defaults (SmolLM2-135M, 512 tokens of pydoc text, decode semantics, vs the
    uncompressed cache of the same run; README has the table): plain K4/V2 costs +19.4 % PPL
    (KLD 0.166); norm correction on vs off: KLD 0.166 vs 0.221; 4 sinks + 128-token window:
    +0.71 ± 0.56 % PPL, KLD 0.0050. The window is paid for in bytes at short contexts and
    amortized at long ones; ``sinks=0, window=0`` gives the codes alone.
    """

    bits_k: int = 4
    bits_v: int = 2
    sinks: int = 4
    window: int = 128
    seed: int = 0
    norm_correction: bool = True

    def __post_init__(self):
        check_bits("bits_k", self.bits_k)
        check_bits("bits_v", self.bits_v)
        check_count("sinks", self.sinks)
        check_count("window", self.window)
        check_count("seed", self.seed)
        if not isinstance(self.norm_correction, bool):
            raise TypeError(f"norm_correction must be a bool, got {self.norm_correction!r}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``K4V2`` (``+s4w32`` when sinks/window are on)."""
        extra = (f"s{self.sinks}" if self.sinks else "") + (f"w{self.window}" if self.window else "")
        return f"K{self.bits_k}V{self.bits_v}" + (f"+{extra}" if extra else "")

    @property
    def avg_bits(self) -> float:
        """Mean code bits per channel over K and V (norms, sinks and window not included)."""
        return (self.bits_k + self.bits_v) / 2
