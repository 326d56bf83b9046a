"""mlx-lm integration: a cache object for ``mlx_lm.generate`` / ``stream_generate``, and attention over it.

mlx-lm routes any cache with a ``bits`` attribute to its own quantized attention, so this cache
exposes none (the bit widths are under ``tq_config``). Since mlx-lm 0.32 imports
``make_prompt_cache`` by name, patching that module attribute does not take effect; instead
``patch`` gives the model a ``make_cache`` method, which ``make_prompt_cache`` asks first, and
callers may pass ``prompt_cache=make_cache(model, config)`` explicitly.

Two ways attention reads a compressed layer:
* reference: ``update_and_fetch`` returns dense K/V (the history decoded).
* over the codes: ``patch`` wraps the ``scaled_dot_product_attention`` that the model's module
  imported from ``mlx_lm.models.base`` (patched where it is used). The wrapper attends over the
  layer's ``View`` when the cache it is handed is a ``TurboQuantMLXCache`` made for it (``fast``),
  and calls the original otherwise, so other models of the same module are unaffected, and mlx-lm's
  own caches keep their attention: a ``QuantizedKVCache`` (it has ``bits``; the mlxkv peer,
  ``quantized_cache``) is handed untouched to mlx-lm's quantized attention.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache, create_attention_mask

from ..config import CacheConfig
from ..kvstore import LayerStore

_WRAPPED = "_tq_original"  # attribute of the wrapper: the function it replaced


class TurboQuantMLXCache(_BaseCache):
    """One layer of compressed K/V for mlx-lm models; keys/values are (B, H, T, D).

    ``module``: the model's module. While ``patch`` has wrapped its attention, ``update_and_fetch``
    returns the call's own K/V and keeps the layer's ``View`` in ``view`` for the wrapper (``fast``);
    otherwise it returns dense K/V that any attention reads.
    """

    def __init__(self, config: CacheConfig, layer_idx: int, simulate: bool = False, module=None,
                 reserve: int = 0, attention: str = "auto", span: int = 0):
        self.tq_config = config
        self.span = span  # a sliding-window layer's window (mlx-lm's RotatingKVCache max_size); 0: full
        self.layer_idx = layer_idx
        self.simulate = simulate
        self.attention = attention
        self.module = module
        self.reserved = reserve
        self.store: LayerStore | None = None
        self.view = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        if self.store is None:
            self.store = LayerStore(self.tq_config, self.layer_idx, keys.shape[-1], simulate=self.simulate,
                                    head_dim_v=values.shape[-1], attention=self.attention, span=self.span)
            if self.reserved:
                self.store.reserve(keys, self.reserved)
        view = self.store.update(keys, values)
        self.offset = self.store.length
        if self.fast:
            self.view = view
            return keys, values
        return view.dense(keys.dtype, values.dtype)

    @property
    def fast(self) -> bool:
        """Attention reads the codes: the model's module has the wrapped attention right now."""
        return (not self.simulate and self.attention != "reference" and self.module is not None
                and _installed(self.module))

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        """The mask over what this layer holds and ``N`` new positions. A sliding-window layer holds only
        its last ``span - 1`` positions: one new token reads them all; more, their causal window."""
        if not self.span:
            return create_attention_mask(N, offset=self.offset, return_array=return_array, window_size=window_size)
        if N == 1:
            return None
        held = 0 if self.store is None else self.store.held
        return create_causal_mask(N, held, window_size=window_size or self.span)

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
        arrays = [s.sink_k, s.sink_v, s.win_k, s.win_v, s.center_k]
        for hist in (s.hist_k, s.hist_v):
            arrays += list((hist.buffers or {}).values())
        return [a for a in arrays if a is not None]

    @state.setter
    def state(self, v):
        raise NotImplementedError("a TurboQuantMLXCache cannot be restored from a saved state")

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batch generation merges per-prompt caches into one left-padded batch cache; a
        compressed cache cannot be merged (its sinks would hold the padding): refused clearly."""
        raise NotImplementedError(
            "TurboQuantMLXCache cannot be merged into a batch (mlx-lm batch_generate / BatchGenerator): "
            "generate one prompt at a time with a compressed cache, or unpatch the model for batches")

    def nbytes_parts(self) -> dict:
        return {"sinks": 0, "window": 0, "other": 0} if self.store is None else self.store.nbytes()

    @property
    def nbytes(self):
        return sum(self.nbytes_parts().values())


def _attention(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        view = cache.view if isinstance(cache, TurboQuantMLXCache) else None
        if view is None:
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        cache.view = None
        if sinks is not None:  # learned attention sinks (gpt-oss): read the dense reference path
            k, v = view.dense(keys.dtype, values.dtype)
            return original(queries, k, v, cache=None, scale=scale, mask=mask, sinks=sinks)
        if isinstance(mask, str) or mask is None:  # "causal" among the call's own tokens, the default
            mask = None
        elif mask.ndim == 2:
            mask = mask.reshape(1, 1, *mask.shape)
        return view.attend(queries, scale, mask=mask)

    setattr(scaled_dot_product_attention, _WRAPPED, original)
    scaled_dot_product_attention.users = 0  # patched models reading through it
    return scaled_dot_product_attention


def _model_module(model):
    return sys.modules[type(model).__module__]


def _installed(module) -> bool:
    return hasattr(getattr(module, "scaled_dot_product_attention", None), _WRAPPED)


def make_cache(model, config: CacheConfig, simulate: bool = False, reserve: int = 0,
               attention: str = "auto") -> list:
    """The compressed prompt cache of an mlx-lm model (pass as ``prompt_cache=``); attention reads
    the codes while ``patch`` has wrapped this model's module, the dense reference otherwise.

    Where mlx-lm makes a plain ``KVCache`` (full attention; every layer of a model without its own
    ``make_cache``), a compressed layer; where it makes a ``RotatingKVCache`` without kept positions
    (a sliding-window layer), a compressed layer holding only its window when the config's
    ``sliding`` is "codes"; any other layer (sliding by default; chunked, linear attention, ...) as
    mlx-lm makes it."""
    module = _model_module(model)

    def layer(i, c):
        span = _span(c)
        if span is None or (span and config.sliding != "codes"):
            return c
        return TurboQuantMLXCache(config, i, simulate, module=module, reserve=reserve, attention=attention,
                                  span=span)

    return [layer(i, c) for i, c in enumerate(library_cache(model))]


def _span(c) -> int | None:
    """What a compressed layer in place of mlx-lm's cache ``c`` attends over: 0 for a plain
    ``KVCache`` (full attention), the window for a ``RotatingKVCache`` without kept positions (a
    sliding-window layer), None for any other (left as mlx-lm makes it)."""
    if type(c) is KVCache:
        return 0
    if type(c) is RotatingKVCache and not c.keep:
        return c.max_size
    return None


def library_cache(model) -> list:
    """The prompt cache mlx-lm makes for ``model`` (its class's ``make_cache`` where it has one, a
    ``KVCache`` per layer otherwise), whether or not ``patch`` has replaced the model's own."""
    own = getattr(type(model), "make_cache", None)
    return own(model) if own is not None else [KVCache() for _ in range(len(model.layers))]


def sliding_layers(model) -> int:
    """How many of ``model``'s layers are sliding-window layers a compressed cache can hold (``_span``)."""
    return sum(bool(_span(c)) for c in library_cache(model))


def baseline_cache(model) -> list:
    """The uncompressed baseline: mlx-lm's own prompt cache (sliding-window layers as rotating caches)."""
    return library_cache(model)


def quantized_cache(model, bits: int, group_size: int) -> list:
    """mlx-lm's own prompt cache for ``model`` (``make_prompt_cache``: the model's ``make_cache`` where
    it has one) with every plain ``KVCache`` layer replaced by mlx-lm's ``QuantizedKVCache(group_size,
    bits)``: the layers mlx-lm's own ``to_quantized`` can quantize. Others (``RotatingKVCache`` of
    sliding layers, whose ``to_quantized`` mlx-lm leaves unimplemented, ...) stay as mlx-lm makes them.

    It has ``bits``, so mlx-lm's attention reads it with ``quantized_scaled_dot_product_attention``
    (and ``enable_attention``'s wrapper passes it through untouched). It quantizes from the first
    token; mlx-lm's generate with ``kv_bits`` would keep the first ``quantized_kv_start`` tokens in a
    plain cache instead, and this measures the cache itself."""
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    from ..methods.base import Unsupported

    caches = make_prompt_cache(model)
    out = [QuantizedKVCache(group_size=group_size, bits=bits) if type(c) is KVCache else c for c in caches]
    if not any(isinstance(c, QuantizedKVCache) for c in out):
        raise Unsupported(f"no layer of this mlx-lm model has a plain KVCache that mlx-lm can quantize "
                          f"({', '.join(sorted({type(c).__name__ for c in caches}))})")
    return out


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


def greedy(model, tokenizer, ids: list[int], cache, max_new_tokens: int) -> list[int]:
    """Greedy-decode ``max_new_tokens`` after ``ids`` through ``cache`` with mlx-lm's own
    ``stream_generate`` (stops early at end-of-sequence); returns the new token ids."""
    from mlx_lm import stream_generate

    new = []
    for resp in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_new_tokens, prompt_cache=cache):
        new.append(int(resp.token))
        if resp.finish_reason is not None:
            break
    return new


def is_model(model) -> bool:
    """An mlx-lm model as ``mlx_lm.load`` returns it: an ``nn.Module`` with a ``model_type`` and its
    decoder ``layers`` (not its inner decoder, a layer or a tokenizer)."""
    import mlx.nn as nn

    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "model_type", None), str):
        return False
    try:
        return len(model.layers) > 0
    except (AttributeError, TypeError):
        return False


def check_model(model, config: CacheConfig) -> None:
    """Refuse, before anything is changed, what ``patch`` cannot make generate with ``config``."""
    if not is_model(model):
        raise TypeError(f"model must be an mlx-lm model (as mlx_lm.load returns it: with model_type and "
                        f"layers), got {type(model).__module__}.{type(model).__name__}")
    from .. import methods
    from ..models import geometry

    try:
        head_dim = geometry(model.args).head_dim
    except (AttributeError, TypeError, ZeroDivisionError):
        return  # an unusual config: the cache meets the head size on first use instead
    for kind in ("k", "v"):
        methods.get(config.method).codec(config, 0, kind, head_dim)


def enable_attention(model) -> bool:
    """Wrap the attention of ``model``'s module so compressed caches made for it are read over their
    codes (other caches pass through to the original). Returns whether there was one to wrap."""
    module = _model_module(model)
    fn = getattr(module, "scaled_dot_product_attention", None)
    if fn is None:
        return False
    if not hasattr(fn, _WRAPPED):
        fn = module.scaled_dot_product_attention = _attention(fn)
    fn.users += 1
    return True


def disable_attention(model, wrapped: bool) -> None:
    module = _model_module(model)
    if wrapped and _installed(module):
        fn = module.scaled_dot_product_attention
        fn.users -= 1
        if fn.users <= 0:  # the last model of this module that used it: restore the original
            module.scaled_dot_product_attention = getattr(fn, _WRAPPED)


class _MakeCache:
    """A patched model's ``make_cache`` (which mlx-lm's ``make_prompt_cache`` asks first). An
    object, not a closure, so that ``copy.deepcopy(model)`` copies it with the model and the copy
    makes caches for itself."""

    def __init__(self, model, config: CacheConfig):
        self.model, self.config = model, config

    def __call__(self):
        return make_cache(self.model, self.config)

    def __deepcopy__(self, memo):
        import copy

        # The copy is a patched model too: it counts as a user of its module's wrapped attention.
        new = _MakeCache(copy.deepcopy(self.model, memo), self.config)
        enable_attention(new.model)
        return new


def patch(model, config: CacheConfig) -> dict:
    wrapped = enable_attention(model)
    model.make_cache = _MakeCache(model, config)
    return {"wrapped": wrapped}


def unpatch(model, state: dict) -> None:
    del model.make_cache
    disable_attention(model, state.get("wrapped", False))


__all__ = ["TurboQuantMLXCache", "make_cache", "baseline_cache", "cache_nbytes", "greedy", "patch", "unpatch"]
