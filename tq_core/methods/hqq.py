"""hqq: transformers' ``QuantizedCache`` with the HQQ backend (half-quadratic quantization).

Like ``quanto`` (a full-precision residual window of fewer than ``residual_length`` tokens; older
tokens quantized, all of them again at each flush), with HQQ's optimized zero points: per group of
``q_group_size`` (64 by default) channels, ``nbits`` codes and a scale and a zero in the model's
dtype. Keys and values are quantized on axis 1, as transformers' docs recommend for the HQQ
backend (its default, 0, is the quanto recommendation); each group is then one token's channels.

HQQ packs the rows of groups together, 8 / ``nbits`` rows per byte row, and drops the rows that do
not fill one: a cache whose groups per token (kv_heads x head_dim / group) are not a multiple of
that cannot read back some token counts. Such a model is refused (``Unsupported``) with the group
sizes that would work (SmolLM2-135M: 3 KV heads x 64 channels, so g=64 fits 8 bits only; g=32 fits
4 and 8, g=16 fits 2, 4 and 8). 3 bits are refused: HQQ's 3-bit packing (10 codes per int32) does
not dequantize to its input's shape here (hqq 0.2.8, every shape tried).

Label ``hqq:K<b>V<b>+s0w<residual_length>[+g=<group size>]``, b in 1, 2, 4, 8. Torch hosts only.
"""

from __future__ import annotations

from .base import Unsupported
from .peer import check_host
from .quanto import INSTALL, Quanto


class HQQ(Quanto):
    name = "hqq"
    requires = (("hqq", INSTALL),)
    library = "transformers QuantizedCache, HQQ backend"
    bits = (1, 2, 4, 8)
    bits_note = " (3 is refused: HQQ's 3-bit packing does not read back to its input's shape)"
    backend = "hqq"
    axis = 1  # transformers' docs: axis-key and axis-value 1 for the HQQ backend

    def make_cache(self, lib: str, model, config):
        """As ``Quanto.make_cache``; also ``Unsupported`` for a model whose groups HQQ cannot pack
        (see the module docstring)."""
        from ..models import geometry

        check_host(self, lib)
        geo = geometry(model.config)
        group = self.check_group(config, geo.head_dim)
        per_token = geo.kv_heads * geo.head_dim // group
        pack = 8 // config.bits_k
        if per_token % pack:
            fits = [g for g in (16, 32, 64, 128)
                    if geo.head_dim % g == 0 and (geo.kv_heads * geo.head_dim // g) % pack == 0]
            raise Unsupported(
                f"{config.label}: HQQ packs {pack} rows of groups together at {config.bits_k} bits and this model holds "
                f"{per_token} groups of {group} per token ({geo.kv_heads} KV heads x {geo.head_dim}), so some token "
                f"counts cannot be read back; " + (f"g={' or g='.join(map(str, fits))} fits" if fits else
                                                   "no group size fits this model"))
        return super().make_cache(lib, model, config)
