"""Validated configuration of a compressed KV cache, and its label.

A config names a KV method (``tq_core.methods``), its bits for keys and values (independent), the
full-precision sinks and recent window, the seed, and the method's own options. Its label is the
key everything is filed under (results, gates, reports) and round-trips:
``CacheConfig.parse(c.label) == c``.

Label grammar::

    [<method>:]K<bits_k>V<bits_v>+s<sinks>w<window>[+<option>=<value>]...

``turboquant`` is the method when none is named. Options appear only when they differ from
their default, in a fixed order: ``seed=<int>``, ``sw=codes`` (sliding-window layers encoded
too), then the method's own (TurboQuant: ``nc=0`` for
norm correction off, ``c=1`` for keys held centered; uniform and the peers quanto, hqq, mlxkv: ``g=<group size>``;
llamacpp: ``t=1`` or ``t=nl``, llama.cpp's type family). Examples: ``K4V2+s4w128`` (the default),
``K4V2+s0w0`` (the codes alone), ``K4V2+s0w0+nc=0``, ``uniform:K4V2+s4w128+g=32``. When parsing,
``+s..w..`` may be left out (the default sinks and window apply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

DEFAULT_METHOD = "turboquant"
# How a cache holds a model's sliding-window layers (e.g. Gemma 3's local layers):
SLIDING = {
    "keep": "kept as the host library holds them (16-bit, its own sliding-window cache)",
    "codes": "encoded like the full-attention layers, holding only the window's last positions",
}


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
    method: the KV method that encodes the history (``tq_core.methods.METHODS``).
    norm_correction: TurboQuant: store ``|x| / |x_hat_unit|`` so decoded vectors keep their norm.
    center: TurboQuant (label option ``c=1``): hold keys minus a per-head mean fixed when the
        first tokens leave the window (``tq_core.kvstore``): a key offset shared by every token (a
        k_proj bias) changes no attention weight but is what the codes would spend their error
        on. Measured at 1 024 tokens, decode semantics, K4V2+s4w128 (README, Recommended configs):
        KLD 1.85 -> 0.0038 on Qwen2.5-Coder-1.5B, 0.0144 -> 0.0050 on Gemma-3 270M, 0.0088 ->
        0.0075 on SmolLM2-135M. Off by default until the default model's bands are recalibrated.
    group_size: uniform method: channels per scale/zero group (0 = the whole vector); the peers
        quanto, hqq, mlxkv: their group size (0 = the library's default, 64).
    variant: llamacpp method: llama.cpp's type family for 5 and 4 bits ("" q5_0/q4_0, "1" q5_1/q4_1,
        "nl" iq4_nl); label option ``t=``.
    sliding: how sliding-window layers are held (``SLIDING``): "keep" (default: as the host
        library holds them, 16-bit, at most W - 1 positions for a window of W) or "codes" (label
        option ``sw=codes``; as llama.cpp's KV types do: the last W - 1 positions, the sinks while
        among them and the config's window in full precision, the rest encoded). Peers hold them as their library
        does. Both measured on Gemma-3 270M (15 of 18 layers sliding, W = 512; 1 024 tokens of
        pydoc text, decode semantics, torch-cpu; reports/results/cpu/20261201T090425_3a6ed4dc7b.json):
        K4V2+s4w128 KLD 0.0144 +- 0.0010 at 14.1 bits held, with sw=codes 0.0169 +- 0.0009 at 4.05
        bits; K4V4+s4w128+sw=codes 0.0143 +- 0.0008 at 4.72 bits. "keep" stays the default (a
        model's sliding layers are then exactly the library's; their bytes stop growing at W); for
        the fewest bytes at that quality, K4V4 with sw=codes (bits held at 4k tokens: 2.24 keep,
        1.39 codes, memory suite).

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
    center: bool = False
    method: str = DEFAULT_METHOD
    group_size: int = 0
    variant: str = ""
    sliding: str = "keep"

    def __post_init__(self):
        check_bits("bits_k", self.bits_k)
        check_bits("bits_v", self.bits_v)
        check_count("sinks", self.sinks)
        check_count("window", self.window)
        check_count("seed", self.seed)
        check_count("group_size", self.group_size)
        if not isinstance(self.variant, str):
            raise TypeError(f"variant must be a str, got {type(self.variant).__name__} {self.variant!r}")
        if self.sliding not in SLIDING:
            raise ValueError(f"sliding must be one of {', '.join(map(repr, SLIDING))}, got {self.sliding!r}")
        for name in ("norm_correction", "center"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        from .methods import get  # the registry validates the method's own options

        get(self.method).check_config(self)

    # ---- label ------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Canonical name, e.g. ``K4V2+s4w128``; ``CacheConfig.parse(label)`` gives this config back."""
        from .methods import get

        prefix = "" if self.method == DEFAULT_METHOD else f"{self.method}:"
        options = (([f"seed={self.seed}"] if self.seed else []) + ([f"sw={self.sliding}"] if self.sliding != "keep" else [])
                   + get(self.method).label_options(self))
        return (f"{prefix}K{self.bits_k}V{self.bits_v}+s{self.sinks}w{self.window}"
                + "".join(f"+{o}" for o in options))

    @classmethod
    def parse(cls, label: str) -> "CacheConfig":
        """The config a label names (see the module docstring); one clear ValueError otherwise."""
        from .methods import METHODS, get

        if not isinstance(label, str):
            raise TypeError(f"config label must be a str, got {type(label).__name__}")
        m = _LABEL.fullmatch(label.strip())
        if m is None:
            raise ValueError(f"config label {label!r} is not of the form "
                             "[method:]K<bits>V<bits>[+s<sinks>w<window>][+option=value...], e.g. K4V2+s4w128")
        method = m["method"] or DEFAULT_METHOD
        if method not in METHODS:
            raise ValueError(f"config label {label!r}: unknown method {method!r} (known: {', '.join(METHODS)})")
        kw: dict = dict(method=method, bits_k=int(m["k"]), bits_v=int(m["v"]))
        if m["s"] is not None:
            kw.update(sinks=int(m["s"]), window=int(m["w"]))
        seen = set()
        for opt in filter(None, (m["opts"] or "").split("+")):
            key, _, value = opt.partition("=")
            if key in seen:
                raise ValueError(f"config label {label!r}: option {key!r} given twice")
            seen.add(key)
            if key == "seed" and value.isdigit():
                kw["seed"] = int(value)
                continue
            if key == "sw":
                if value not in SLIDING:
                    raise ValueError(f"config label {label!r}: sw must be one of {', '.join(SLIDING)}, got {value!r}")
                kw["sliding"] = value
                continue
            try:
                kw.update(get(method).parse_option(key, value))
            except ValueError as e:
                raise ValueError(f"config label {label!r}: {e}") from None
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config label {label!r}: {e}") from None

    # ---- derived ----------------------------------------------------------------------------
    @property
    def avg_bits(self) -> float:
        """Mean code bits per channel over K and V (norms, sinks and window not included)."""
        return (self.bits_k + self.bits_v) / 2

    @property
    def centers_keys(self) -> bool:
        """Whether a cache of this config holds keys centered: ``center`` set and the method takes it."""
        from .methods import get

        return self.center and "center" in get(self.method).options

    @property
    def full_precision(self) -> int:
        """Positions held in full precision once the cache is full: sinks + window."""
        return self.sinks + self.window

    def replace(self, **changes) -> "CacheConfig":
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise TypeError(f"CacheConfig has no field {bad[0]!r} (fields: {', '.join(sorted(known))})")
        return type(self)(**{**{f: getattr(self, f) for f in known}, **changes})


_LABEL = re.compile(r"(?:(?P<method>[a-z][a-z0-9_-]*):)?K(?P<k>\d+)V(?P<v>\d+)"
                    r"(?:\+s(?P<s>\d+)w(?P<w>\d+))?(?P<opts>(?:\+[a-z_]+=[A-Za-z0-9_.-]+)*)")
