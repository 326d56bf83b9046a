"""mlxkv: mlx-lm's own ``QuantizedKVCache``, read through mlx-lm's own quantized attention.

Per layer it holds keys and values as ``mx.quantize`` gives them: ``bits``-bit codes packed in
uint32 with a scale and a bias per group of ``group_size`` (64 by default) channels, in the
model's dtype, preallocated in steps of 256 tokens (its bytes are the allocation, as for mlx-lm's
``KVCache``). It has ``bits``, so ``mlx_lm.models.base.scaled_dot_product_attention`` attends
with ``quantized_scaled_dot_product_attention`` over the codes (``mx.quantized_matmul``).

It quantizes from the first token: no sinks, no window. (mlx-lm's generate with ``kv_bits`` keeps
the first ``quantized_kv_start`` tokens, 5000 by default, in a plain cache and converts it with
``to_quantized`` after; this method measures the quantized cache itself.) Only the layers whose
cache ``to_quantized`` supports (plain ``KVCache``) are quantized; others (``RotatingKVCache`` of
sliding layers) stay as mlx-lm makes them and count as ``uncompressed``.

Label ``mlxkv:K<b>V<b>+s0w0[+g=<32|64|128>]``, b in what ``mlx.core.quantize`` takes. MLX hosts only.
"""

from __future__ import annotations

from .base import Unsupported
from .peer import Peer, check_host


class MLXKV(Peer):
    name = "mlxkv"
    hosts = ("mlx",)
    requires = (("mlx_lm", "pip install 'tq-core[mlx]'"),)
    library = "mlx-lm QuantizedKVCache"
    bits = (1, 2, 3, 4, 5, 6, 8)  # the affine bit widths mlx.core.quantize takes (mlx 0.32)
    group_sizes = (32, 64, 128)
    windowed = False

    def make_cache(self, lib: str, model, config) -> list:
        """mlx-lm's per-layer caches for ``model`` (an mlx-lm model), plain layers quantized."""
        check_host(self, lib)
        from ..integrations import mlx_lm
        from ..models import geometry

        head_dim = geometry(model.args).head_dim
        group = self.check_group(config, head_dim)
        per_word = 32 // config.bits_k
        if head_dim * config.bits_k % 32 or head_dim // per_word != head_dim * config.bits_k // 32:
            # QuantizedKVCache allocates head_dim // (32 // bits) words per vector: only exact when bits
            # pack whole uint32 words into a head (e.g. 5 bits at head_dim 128 does not)
            raise Unsupported(f"{config.label}: mlx-lm's QuantizedKVCache allocates {head_dim // per_word} words "
                              f"per {head_dim}-channel vector at {config.bits_k} bits, mx.quantize fills "
                              f"{head_dim * config.bits_k / 32:g}")
        return mlx_lm.quantized_cache(model, config.bits_k, group)
