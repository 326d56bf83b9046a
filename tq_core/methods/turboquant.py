"""TurboQuant: a seeded Haar rotation, then a Lloyd-Max scalar code per coordinate (``tq_core.quantizer``).

Per vector it holds packed codes (``bits`` per channel) and one fp16 norm. It attends in the
rotated space: the query is rotated once per step, history vectors are ``s * c[code]`` with no
rotation, and the weighted sum of values is rotated back once.
"""

from __future__ import annotations

from .. import kernels
from ..quantizer import TurboQuantizer
from ..rotation import derive_seed
from .base import Codec, Method


class TurboQuantCodec(Codec):
    """``fused``: encode through the device's fused kernel where one exists (``tq_core.kernels``)."""

    def __init__(self, quantizer: TurboQuantizer, fused: bool = True):
        self.q = quantizer
        self.fused = fused
        self.dim, self.bits = quantizer.dim, quantizer.bits

    def fields(self) -> dict:
        return {"codes": ((self.q.code_bytes,), "uint8"), "norms": ((), "float16")}

    def encode(self, x) -> dict:
        # A fused kernel where the device has one (one pass instead of a dozen array ops).
        fused = kernels.encode(self.q, x) if self.fused else None
        if fused is not None:
            return {"codes": fused[0], "norms": fused[1]}
        # No host sync per layer per step: NaN/Inf K/V propagate to the output (see TurboQuantizer.encode).
        enc = self.q.encode(x, check=False)
        return {"codes": enc.codes, "norms": enc.norms}

    def encode_into(self, x, out: dict) -> bool:
        # The fused kernel writes TurboQuant's own fields; a codec holding others encodes through encode().
        if not self.fused or set(out) != {"codes", "norms"}:
            return False
        return kernels.encode_into(self.q, x, out["codes"], out["norms"])

    def decode(self, parts: dict, dtype=None):
        return self.q.decode_parts(parts["codes"], parts["norms"], dtype)

    def query(self, q):
        return self.q.rotate(q)

    def values_space(self, parts: dict, dtype):
        return self.q.centroid_values(parts["codes"], parts["norms"], dtype)

    def output(self, u):
        return self.q.unrotate(u)


class TurboQuant(Method):
    name = "turboquant"
    options = ("norm_correction", "center")

    def label_options(self, config) -> list[str]:
        return ([] if config.norm_correction else ["nc=0"]) + (["c=1"] if config.center else [])

    def parse_option(self, key: str, value: str) -> dict:
        if key == "nc" and value in ("0", "1"):
            return {"norm_correction": value == "1"}
        if key == "c" and value in ("0", "1"):
            return {"center": value == "1"}
        raise ValueError(f"unknown option {key}={value!r} for method 'turboquant' "
                         "(allowed: nc=0, nc=1, c=0, c=1, seed=<int>)")

    def codec(self, config, layer: int, kind: str, dim: int) -> TurboQuantCodec:
        bits = config.bits_k if kind == "k" else config.bits_v
        return TurboQuantCodec(TurboQuantizer(dim, bits, derive_seed(config.seed, layer, kind),
                                              norm_correction=config.norm_correction))
