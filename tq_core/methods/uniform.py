"""Uniform: per-token affine integer codes, the way KIVI and mlx-lm quantize a KV cache (no rotation).

Each vector is split into groups of ``group_size`` channels (0 = the whole vector); per group it
holds ``b``-bit codes ``round((x - min) / scale)`` with ``scale = (max - min) / (2^b - 1)``, and the
fp16 ``scale`` and ``min``. Scale and min are rounded to fp16 before the codes are chosen, so the
stored numbers decode exactly as they were chosen: ``x_hat = code * scale + min``.
"""

from __future__ import annotations

from .. import packing
from ..ops import for_array
from .base import Codec, Method


class UniformCodec(Codec):
    def __init__(self, dim: int, bits: int, group_size: int):
        group = group_size or dim
        if dim % group:
            raise ValueError(f"group_size must divide head_dim {dim}, got {group_size}")
        self.dim, self.bits, self.group = dim, bits, group
        self.groups = dim // group

    def fields(self) -> dict:
        return {"codes": ((packing.packed_size(self.dim, self.bits),), "uint8"),
                "scale": ((self.groups,), "float16"), "zero": ((self.groups,), "float16")}

    def encode(self, x) -> dict:
        ops = for_array(x)
        lead = tuple(x.shape[:-1])
        g = ops.reshape(ops.astype(x, ops.float32), lead + (self.groups, self.group))
        lo, hi = ops.min_last(g), ops.max_last(g)
        levels = (1 << self.bits) - 1
        zero = ops.astype(ops.astype(lo, ops.float16), ops.float32)
        scale = ops.astype(ops.astype((hi - lo) / levels, ops.float16), ops.float32)
        safe = ops.maximum(scale, 1e-30)
        codes = ops.clip(ops.round((g - zero[..., None]) / safe[..., None]), 0, levels)
        return {"codes": packing.pack(ops.reshape(ops.astype(codes, ops.uint8), lead + (self.dim,)), self.bits),
                "scale": ops.astype(scale, ops.float16), "zero": ops.astype(zero, ops.float16)}

    def decode(self, parts: dict, dtype=None):
        codes = parts["codes"]
        ops = for_array(codes)
        lead = tuple(codes.shape[:-1])
        c = ops.astype(packing.unpack(codes, self.bits, self.dim), ops.float32)
        c = ops.reshape(c, lead + (self.groups, self.group))
        x = c * ops.astype(parts["scale"], ops.float32)[..., None] + ops.astype(parts["zero"], ops.float32)[..., None]
        return ops.astype(ops.reshape(x, lead + (self.dim,)), ops.float32 if dtype is None else dtype)


class Uniform(Method):
    name = "uniform"
    options = ("group_size",)

    def label_options(self, config) -> list[str]:
        return [f"g={config.group_size}"] if config.group_size else []

    def parse_option(self, key: str, value: str) -> dict:
        if key == "g" and value.isdigit():
            return {"group_size": int(value)}
        raise ValueError(f"unknown option {key}={value!r} for method 'uniform' (allowed: g=<group size>, seed=<int>)")

    def codec(self, config, layer: int, kind: str, dim: int) -> UniformCodec:
        return UniformCodec(dim, config.bits_k if kind == "k" else config.bits_v, config.group_size)
