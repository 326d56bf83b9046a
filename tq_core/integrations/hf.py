"""transformers integration. All contact with transformers internals lives in this file.

Tested with transformers 5.17 and 5.24. Differences handled here:
* 5.24 names the cache argument ``cache=`` and deprecates ``past_key_values=`` (5.17 has only the
  latter): ``cache_kwarg(model)`` reads the model's forward signature.
* ``cache_utils.get_layer_types_and_kwargs`` returns per-layer kwargs as a list in 5.24 and as one
  dict shared by all layers in 5.17.
"""

from __future__ import annotations

import inspect

import torch
from transformers import cache_utils as _cu

from ..config import CacheConfig
from ..kvstore import LayerStore


def cache_kwarg(model) -> str:
    """Name of the argument through which ``model`` (and its ``generate``) takes a cache."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TurboQuantLayer(_cu.DynamicLayer):
    """One full-attention layer whose history is held as packed TurboQuant codes."""

    is_croppable = False

    def __init__(self, config: CacheConfig, layer_idx: int, simulate: bool = False):
        super().__init__()
        self.tq_config = config
        self.layer_idx = layer_idx
        self.simulate = simulate
        self.store: LayerStore | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.store = LayerStore(self.tq_config, self.layer_idx, key_states.shape[-1], simulate=self.simulate)
        # Empty placeholders: transformers code may read `.keys`/`.values`; nothing is held there.
        self.keys = key_states.new_zeros((0,))
        self.values = value_states.new_zeros((0,))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.update(key_states, value_states)

    def get_seq_length(self) -> int:
        return 0 if self.store is None else self.store.length

    def reset(self) -> None:
        self.store = None
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        if self.store is not None:
            self.store.select_batch(beam_idx)

    def batch_select_indices(self, indices) -> None:
        if self.store is not None:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self.store.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None and self.store.length:
            batch = _batch_size(self.store)
            self.store.select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "TurboQuantCache cannot crop: history is held encoded (assisted decoding is not supported)")

    def offload(self):
        pass

    def prefetch(self):
        pass


def _batch_size(store: LayerStore) -> int:
    for x in (store.sink_k, store.win_k, None if store.hist_k is None else store.hist_k.norms):
        if x is not None:
            return x.shape[0]
    return 0


class TurboQuantCache(_cu.Cache):
    """A transformers ``Cache`` holding K/V as TurboQuant codes.

    Full-attention layers are compressed; other layer types (sliding-window, chunked, linear)
    keep transformers' own dynamic layers, so such models work instead of being refused.

    Args:
        model_config: the model's config (``model.config``), used for layer types; if ``None``,
            every layer is a compressed full-attention layer, created on first use.
        config: a ``CacheConfig``; or give its fields as keywords (``bits_k=4, bits_v=2, ...``).
        simulate: quantize every K/V before attention, this step's own tokens included (the
            "simulated" scoring mode); off for real use.
    """

    def __init__(self, model_config=None, config: CacheConfig | None = None, simulate: bool = False, **fields):
        self.tq_config = config if config is not None else CacheConfig(**fields)
        self.simulate = simulate
        if config is not None and fields:
            raise TypeError("give either config= or CacheConfig fields, not both")
        if model_config is None:
            super().__init__(layers=[])
            self._lazy = True
            return
        self._lazy = False
        text = model_config.get_text_config(decoder=True)
        layer_types, per_layer = _cu.get_layer_types_and_kwargs(text)
        if isinstance(per_layer, dict):  # transformers 5.17: one kwargs dict shared by all layers
            per_layer = [per_layer] * len(layer_types)
        layers = [
            TurboQuantLayer(self.tq_config, i, simulate) if kind == "full_attention"
            else _cu.DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw)
            for i, (kind, kw) in enumerate(zip(layer_types, per_layer))
        ]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._lazy:
            while len(self.layers) <= layer_idx:
                self.layers.append(TurboQuantLayer(self.tq_config, len(self.layers), self.simulate))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def compressed_layers(self) -> list[TurboQuantLayer]:
        return [layer for layer in self.layers if isinstance(layer, TurboQuantLayer) and layer.store is not None]

    def nbytes(self) -> dict:
        """Bytes held, by part, measured from the tensors: codes, norms, sinks, window, any other
        array a layer store holds, and layers left uncompressed (e.g. sliding-window ones)."""
        out = {"codes": 0, "norms": 0, "sinks": 0, "window": 0, "other": 0, "uncompressed_layers": 0}
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                if layer.store is not None:
                    for part, n in layer.store.nbytes().items():
                        out[part] += n
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                out["uncompressed_layers"] += layer.keys.nbytes + layer.values.nbytes
        out["total"] = sum(out.values())
        return out


def dynamic_cache(model):
    """A plain transformers DynamicCache for ``model`` (the uncompressed baseline)."""
    return _cu.DynamicCache(config=model.config)


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache, measured from its tensors."""
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes()["total"]
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def make_cache(model, config: CacheConfig, simulate: bool = False) -> TurboQuantCache:
    return TurboQuantCache(model.config, config=config, simulate=simulate)


def is_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def patch(model, config: CacheConfig) -> None:
    """Make ``model.generate`` use a fresh compressed cache unless the caller passes a cache."""
    original = model.generate
    name = cache_kwarg(model)

    def generate(*args, **kwargs):
        if kwargs.get(name) is None:
            kwargs[name] = make_cache(model, config)
        return original(*args, **kwargs)

    generate.__wrapped__ = original
    generate.__doc__ = original.__doc__
    model.generate = generate


def unpatch(model) -> None:
    del model.generate
