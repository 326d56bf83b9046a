"""mlx-lm integration: a cache object for ``mlx_lm.generate`` / ``stream_generate``.

mlx-lm routes any cache with a ``bits`` attribute to its own quantized attention, so this cache
exposes none (the bit widths are under ``tq_config``). Since mlx-lm 0.32 imports
``make_prompt_cache`` by name, patching that module attribute does not take effect; instead
``patch`` gives the model a ``make_cache`` method, which ``make_prompt_cache`` asks first, and
callers may pass ``prompt_cache=make_cache(model, config)`` explicitly.
"""

from __future__ import annotations

from ..blas import use_openblas

use_openblas()  # before mlx.core loads (Linux CPU: see tq_core/blas.py)

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask

from ..config import CacheConfig
from ..kvstore import LayerStore


class TurboQuantMLXCache(_BaseCache):
    """One layer of compressed K/V for mlx-lm models; keys/values are (B, H, T, D)."""

    def __init__(self, config: CacheConfig, layer_idx: int, simulate: bool = False):
        self.tq_config = config
        self.layer_idx = layer_idx
        self.simulate = simulate
        self.store: LayerStore | None = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        if self.store is None:
            self.store = LayerStore(self.tq_config, self.layer_idx, keys.shape[-1], simulate=self.simulate)
        out = self.store.update(keys, values)
        self.offset = self.store.length
        return out

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def size(self):
        return self.offset

    def empty(self):
        return self.store is None

    @property
    def state(self):
        """The arrays held (so ``mx.eval(cache.state)`` materializes them)."""
        s = self.store
        if s is None:
            return []
        arrays = [s.sink_k, s.sink_v, s.win_k, s.win_v]
        for e in (s.hist_k, s.hist_v):
            if e is not None:
                arrays += [e.codes, e.norms]
        return [a for a in arrays if a is not None]

    @state.setter
    def state(self, v):
        raise NotImplementedError("a TurboQuantMLXCache cannot be restored from a saved state")

    def nbytes_parts(self) -> dict:
        empty = {"codes": 0, "norms": 0, "sinks": 0, "window": 0, "other": 0}
        return empty if self.store is None else self.store.nbytes()

    @property
    def nbytes(self):
        return sum(self.nbytes_parts().values())


def make_cache(model, config: CacheConfig, simulate: bool = False) -> list:
    """One compressed cache per layer of an mlx-lm model (pass as ``prompt_cache=``)."""
    return [TurboQuantMLXCache(config, i, simulate) for i in range(len(model.layers))]


def baseline_cache(model) -> list:
    return [KVCache() for _ in range(len(model.layers))]


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


def is_model(model) -> bool:
    import mlx.nn as nn

    return isinstance(model, nn.Module)


def patch(model, config: CacheConfig) -> None:
    model.make_cache = lambda: make_cache(model, config)


def unpatch(model) -> None:
    del model.make_cache


__all__ = ["TurboQuantMLXCache", "make_cache", "baseline_cache", "cache_nbytes", "patch", "unpatch"]
