"""transformers integration. All contact with transformers internals lives in this file.

Tested with transformers 5.17 and 5.24. Differences handled here:
* 5.24 names the cache argument ``cache=`` and deprecates ``past_key_values=`` (5.17 has only the
  latter): ``cache_kwarg(model)`` reads the model's forward signature.
* ``cache_utils.get_layer_types_and_kwargs`` returns per-layer kwargs as a list in 5.24 and as one
  dict shared by all layers in 5.17.

Two ways attention reads a compressed layer:
* reference: ``update`` returns dense K/V (the history decoded), which any attention function
  reads. This is what happens with a ``TurboQuantCache`` passed to an unpatched model.
* over the codes: ``patch`` registers the attention function ``"tq"`` (transformers' attention
  function registry, with the sdpa mask) and switches the model to it. ``update`` then returns the
  call's own K/V tagged with the layer's ``View``, and the attention function attends over what the
  layer holds without decoding the history (``View.attend``). Layers the cache keeps uncompressed
  (sliding window, ...), masks it cannot read and unsupported options fall back to sdpa.
"""

from __future__ import annotations

import inspect

import torch
from transformers import cache_utils as _cu

from ..config import CacheConfig, check_count
from ..kvstore import ATTENTION_MODES, LayerStore

ATTENTION = "tq"  # the attention implementation name ``patch`` registers and selects
_VIEW = "_tq_view"  # attribute of the key tensor handed to the attention function


def cache_kwarg(model) -> str:
    """Name of the argument through which ``model`` (and its ``generate``) takes a cache."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TurboQuantLayer(_cu.DynamicLayer):
    """One full-attention layer whose history is held by a KV method (``LayerStore``)."""

    is_croppable = False
    span = 0  # full attention

    def __init__(self, config: CacheConfig, layer_idx: int, simulate: bool = False, attn_config=None,
                 attention: str = "auto", left_padding: int = 0):
        super().__init__()
        self.tq_config = config
        self.layer_idx = layer_idx
        self.simulate = simulate
        self.attention = attention
        self.attn_config = attn_config  # the model config whose attention implementation is read
        self.left_padding = left_padding
        self.store: LayerStore | None = None
        self.reserved = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.store = LayerStore(self.tq_config, self.layer_idx, key_states.shape[-1], simulate=self.simulate,
                                head_dim_v=value_states.shape[-1], attention=self.attention,
                                lead=self.left_padding, span=self.span)
        if self.reserved:
            self.store.reserve(key_states, self.reserved)
        # Empty placeholders: transformers code may read `.keys`/`.values`; nothing is held there.
        self.keys = key_states.new_zeros((0,))
        self.values = value_states.new_zeros((0,))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = self.store.update(key_states, value_states)
        if (self.simulate or self.attention == "reference"
                or getattr(self.attn_config, "_attn_implementation", None) != ATTENTION):
            return view.dense(key_states.dtype, value_states.dtype)
        key = key_states.view_as(key_states)  # a new tensor object: the caller's is left untouched
        setattr(key, _VIEW, view)
        return key, value_states

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
            self.store.select_batch(torch.arange(self.store.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "TurboQuantCache cannot crop: history is held encoded (assisted decoding is not supported)")

    def offload(self):
        pass

    def prefetch(self):
        pass


class TurboQuantSlidingLayer(TurboQuantLayer):
    """One sliding-window layer held by a KV method: like transformers' ``DynamicSlidingWindowLayer``
    it holds the last ``sliding_window - 1`` positions (``LayerStore``'s ``span``) and gives the
    attention mask the same sizes, so the model's sliding mask reads what it holds."""

    is_sliding = True

    def __init__(self, config: CacheConfig, layer_idx: int, sliding_window: int, **kwargs):
        super().__init__(config, layer_idx, **kwargs)
        self.sliding_window = self.span = sliding_window

    @property
    def cumulative_length(self) -> int:
        return self.get_seq_length()

    # The library's own mask sizes (kv length and offset) for the positions this layer holds.
    get_mask_sizes = _cu.DynamicSlidingWindowLayer.get_mask_sizes

    def get_max_length(self) -> int:
        return self.sliding_window


class TurboQuantCache(_cu.Cache):
    """A transformers ``Cache`` whose full-attention layers hold K/V through a KV method.

    Full-attention layers are compressed; so are sliding-window layers (holding only their window,
    ``TurboQuantSlidingLayer``) when the config's ``sliding`` is "codes"; other layer types
    (sliding by default, chunked, linear) keep transformers' own dynamic layers, so such models
    work instead of being refused.

    Args:
        model_config: the model's config (``model.config``), used for layer types and to read the
            attention implementation; if ``None``, every layer is a compressed full-attention
            layer, created on first use, and attention always reads the dense reference path.
        config: a ``CacheConfig``; or give its fields as keywords (``bits_k=4, bits_v=2, ...``).
        simulate: quantize every K/V before attention, this step's own tokens included (the
            "simulated" scoring mode); off for real use.
        reserve: tokens to preallocate the history for (0: grow by blocks as needed).
        attention: "auto" (fused kernel where one exists), "ops" (array ops over the codes) or
            "reference" (attention reads the decoded history) — see ``LayerStore``.
        left_padding: for a left-padded batch, the most padding positions any row starts with
            (``left_padding(attention_mask)``): they are held in full precision before the sinks,
            so each row's sinks are its first real tokens (``LayerStore``'s ``lead``). A patched
            ``generate`` sets it from its ``attention_mask``; attention over the codes refuses a
            left-padded batch that a cache was not told about.
    """

    def __init__(self, model_config=None, config: CacheConfig | None = None, simulate: bool = False,
                 reserve: int = 0, attention: str = "auto", left_padding: int = 0, **fields):
        if config is not None and fields:
            raise TypeError("give either config= or CacheConfig fields, not both")
        if config is not None and not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig (CacheConfig.parse(label) makes one from a label), "
                            f"got {type(config).__name__}")
        self.tq_config = config if config is not None else CacheConfig(**fields)
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.simulate = simulate
        self.reserved = check_count("reserve", reserve)
        self.attention = attention
        self.left_padding = check_count("left_padding", left_padding)
        self.attn_config = None
        if model_config is None:
            super().__init__(layers=[])
            self._lazy = True
            return
        self._lazy = False
        text = model_config.get_text_config(decoder=True)
        self.attn_config = text
        layer_types, per_layer = _cu.get_layer_types_and_kwargs(text)
        if isinstance(per_layer, dict):  # transformers 5.17: one kwargs dict shared by all layers
            per_layer = [per_layer] * len(layer_types)
        layers = []
        for i, (kind, kw) in enumerate(zip(layer_types, per_layer)):
            window = kw.get("sliding_window") or getattr(text, "sliding_window", None)
            if kind == "full_attention":
                layers.append(self._layer(i))
            elif kind == "sliding_attention" and self.tq_config.sliding == "codes" and window:
                layers.append(self._layer(i, window))
            else:
                layers.append(_cu.DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        super().__init__(layers=layers)

    def _layer(self, i: int, sliding_window: int = 0) -> TurboQuantLayer:
        kw = dict(simulate=self.simulate, attn_config=self.attn_config, attention=self.attention,
                  left_padding=self.left_padding)
        layer = (TurboQuantSlidingLayer(self.tq_config, i, sliding_window, **kw) if sliding_window
                 else TurboQuantLayer(self.tq_config, i, **kw))
        layer.reserved = self.reserved
        return layer

    def set_left_padding(self, n: int) -> None:
        """Hold ``n`` leading positions in full precision before the sinks (see ``left_padding``);
        only before anything is stored."""
        check_count("left_padding", n)
        if self.get_seq_length():
            raise ValueError("left_padding can only be set on an empty cache")
        self.left_padding = n
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                layer.left_padding = n

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._lazy:
            while len(self.layers) <= layer_idx:
                self.layers.append(self._layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def compressed_layers(self) -> list[TurboQuantLayer]:
        return [layer for layer in self.layers if isinstance(layer, TurboQuantLayer) and layer.store is not None]

    def nbytes(self) -> dict:
        """Bytes held, by part, measured from the tensors: the method's fields, spare capacity, sinks,
        window, any other array a layer store holds, and ``uncompressed`` layers (e.g. sliding-window)."""
        out = {"sinks": 0, "window": 0, "other": 0, "uncompressed": 0}
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                if layer.store is not None:
                    for part, n in layer.store.nbytes().items():
                        out[part] = out.get(part, 0) + n
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                out["uncompressed"] += layer.keys.nbytes + layer.values.nbytes
        out["total"] = sum(out.values())
        return out


# ---- attention over the codes ------------------------------------------------------------------
_UNSUPPORTED = ("softcap", "position_bias", "sliding_window", "s_aux", "sinks")


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``"tq"`` attention function: over a compressed layer's ``View`` when the key carries one,
    else (and for what it cannot do) transformers' sdpa. Returns ((B, T, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    view = getattr(key, _VIEW, None)
    if view is not None and kwargs.get("sliding_window") is not None and kwargs["sliding_window"] == view.store.span:
        kwargs = {**kwargs, "sliding_window": None}  # the layer holds just its window; the mask does the rest
    if view is not None and (dropout or kwargs.get("output_attentions")
                             or any(kwargs.get(k) is not None for k in _UNSUPPORTED)):
        key, value = view.dense(key.dtype, value.dtype)
        view = None
    if view is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    _check_padding(view, attention_mask)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = view.attend(query, scale, mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def left_padding(attention_mask) -> int:
    """The most leading padding positions of any row of a (batch, tokens) 0/1 ``attention_mask``
    (0 for None or a batch without left padding)."""
    if attention_mask is None:
        return 0
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (batch, tokens) tensor, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    return int((attention_mask.cumsum(-1) == 0).sum(-1).max()) if attention_mask.numel() else 0


def _check_padding(view, mask) -> None:
    """At a layer's first call (a prefill), refuse a left-padded batch whose cache was not told about
    its padding: its sinks would hold padding instead of each row's first real tokens."""
    store = view.store
    if (mask is None or not store.config.sinks or view.sink_k is not None or view.win_k is not None
            or view.history or view.new is None or mask.dim() != 4):
        return
    live = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    attended = live.any(dim=2).any(dim=1)  # (B, keys): read by some query of the row
    pad = int((attended.cumsum(-1) == 0).sum(-1).max())
    if pad > store.lead:
        raise ValueError(
            f"left-padded batch: a row starts with {pad} padding positions, which this cache would hold as "
            f"its {store.config.sinks} full-precision sinks instead of the row's first real tokens; build "
            f"the cache with TurboQuantCache(..., left_padding={pad}) (tq_core.integrations.hf.left_padding("
            f"attention_mask)), or let a patched model's generate() make it")


def register_attention() -> None:
    """Register ``"tq"`` in transformers' attention and mask registries (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


# ---- what the rest of tq_core and the harness use ----------------------------------------------
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


def make_cache(model, config: CacheConfig, simulate: bool = False, reserve: int = 0,
               attention: str = "auto", left_padding: int = 0) -> TurboQuantCache:
    return TurboQuantCache(model.config, config=config, simulate=simulate, reserve=reserve, attention=attention,
                           left_padding=left_padding)


def sliding_layers(model) -> int:
    """How many of ``model``'s layers are sliding-window attention (transformers' layer types)."""
    layer_types, _ = _cu.get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return sum(kind == "sliding_attention" for kind in layer_types)


def is_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def check_model(model, config: CacheConfig) -> None:
    """Refuse, before anything is changed, what ``patch`` cannot make generate with ``config``: a
    model without ``generate`` (a base model without its head, a layer) or a head size the
    config's method cannot encode."""
    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        raise TypeError(f"model must be a transformers model that can generate (a ...ForCausalLM with "
                        f"generate()), got {type(model).__name__}")
    from ..models import geometry

    try:
        geo = geometry(model.config)
    except (AttributeError, TypeError, ZeroDivisionError):
        return  # an unusual config: the cache meets the head size on first use instead
    _check_codecs(config, geo.head_dim)


def _check_codecs(config: CacheConfig, head_dim: int) -> None:
    from .. import methods

    for kind in ("k", "v"):
        methods.get(config.method).codec(config, 0, kind, head_dim)


def enable_attention(model) -> str:
    """Switch ``model`` to the ``"tq"`` attention function (compressed layers are read over their
    codes; everything else goes to sdpa, as before). Returns the implementation it replaced."""
    register_attention()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    return before


def disable_attention(model, before: str) -> None:
    model.set_attn_implementation(before)


_CACHE_KWARGS = ("cache", "past_key_values")  # 5.24 takes both (the second deprecated); 5.17 the second


class _Generate:
    """A patched model's ``generate``: the original with a fresh compressed cache.

    An object, not a closure, so that ``copy.deepcopy(model)`` copies it with the model: its
    ``model`` and ``original`` (a bound method) then refer to the copy, which generates with its
    own weights (a closure would keep calling the original model).

    The caller's choices win: a cache passed under either name (``cache=``, ``past_key_values=``)
    is used as given, and ``use_cache=False`` (argument, ``generation_config=`` or the model's
    generation config) generates without a cache. A left-padded batch (``attention_mask``) gets a
    cache whose sinks are each row's first real tokens (``left_padding``).
    """

    def __init__(self, model, original, config: CacheConfig):
        self.model, self.original, self.config = model, original, config
        self.__wrapped__ = original
        self.__doc__ = original.__doc__

    def __call__(self, *args, **kwargs):
        pad = left_padding(kwargs.get("attention_mask"))
        given = [kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None]
        if given:
            if isinstance(given[0], TurboQuantCache) and pad and not given[0].get_seq_length():
                given[0].set_left_padding(max(pad, given[0].left_padding))
        elif self._use_cache(args, kwargs):
            kwargs[cache_kwarg(self.model)] = make_cache(self.model, self.config, left_padding=pad)
        return self.original(*args, **kwargs)

    def _use_cache(self, args, kwargs) -> bool:
        if "use_cache" in kwargs:
            return bool(kwargs["use_cache"])
        gen = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        for cfg in (gen, getattr(self.model, "generation_config", None)):
            if cfg is not None and getattr(cfg, "use_cache", None) is not None:
                return bool(cfg.use_cache)
        return True


def patch(model, config: CacheConfig) -> dict:
    """Make ``model.generate`` use a fresh compressed cache unless the caller passes a cache (see
    ``_Generate``), and make attention read the codes (``check_model`` first: ``tq_core.patch``
    does). Returns what ``unpatch`` needs to restore."""
    before = enable_attention(model)
    model.generate = _Generate(model, model.generate, config)
    return {"attn_implementation": before}


def unpatch(model, state: dict) -> None:
    del model.generate
    disable_attention(model, state["attn_implementation"])


# ---- transformers' own QuantizedCache (the quanto and hqq peers, tq_core.methods) ---------------
def quantized_cache(model, backend: str, nbits: int, group_size: int, residual_length: int, axis: int):
    """transformers' ``QuantizedCache(backend, ...)`` for ``model``, keys and values on ``axis``.

    It refuses models with any layer that is not full attention (sliding window, ...): refused here
    first, as ``Unsupported`` naming the layer types, so the harness skips with that reason."""
    from ..methods.base import Unsupported

    layer_types, _ = _cu.get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise Unsupported(f"transformers' QuantizedCache ({backend}) takes only full-attention models; this one "
                          f"has {', '.join(other)} layers")
    return _cu.QuantizedCache(backend, model.config, nbits=nbits, axis_key=axis, axis_value=axis,
                              q_group_size=group_size, residual_length=residual_length)


def is_quantized_cache(cache) -> bool:
    return isinstance(cache, _cu.QuantizedCache)


def quantized_layers(cache) -> list[dict]:
    """What each layer of a transformers ``QuantizedCache`` holds, from its own tensors.

    Per layer that has stored anything: ``quantized`` (its quantized keys and values as the backend
    keeps them: optimum-quanto QTensors, or HQQ's (codes, meta) pairs), ``residual`` (the
    full-precision recent K/V, (B, H, R, D), not yet quantized), ``tokens`` held, ``encoded``
    (tokens held quantized: tokens - R), ``heads`` (KV heads) and ``dims`` (head_dim of K, V)."""
    out = []
    for layer in cache.layers:
        qk, qv = getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)
        if qk is None:
            continue
        shape_k, shape_v = _quantized_shape(qk), _quantized_shape(qv)
        res = layer.keys.shape[-2] if isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4 else 0
        tokens = int(layer.get_seq_length())
        out.append({"quantized": (qk, qv), "residual": (layer.keys, layer.values), "tokens": tokens,
                    "encoded": tokens - res, "heads": int(shape_k[1]), "dims": (int(shape_k[-1]), int(shape_v[-1]))})
    return out


def _quantized_shape(q) -> tuple:
    """(B, H, T, D) of what a quantized layer encoded: an optimum-quanto QTensor is a tensor of that
    shape; HQQ keeps (codes, meta) with the original shape in meta."""
    return tuple(q.shape) if isinstance(q, torch.Tensor) else tuple(q[1]["shape"])


def baseline_cache(model):
    """The uncompressed baseline: transformers' own DynamicCache."""
    return dynamic_cache(model)


def greedy(model, tokenizer, ids: list[int], cache, max_new_tokens: int) -> list[int]:
    """Greedy-decode ``max_new_tokens`` after ``ids`` through ``cache`` with transformers' own
    ``generate`` (stops early at end-of-sequence); returns the new token ids."""
    device = next(model.parameters()).device
    inp = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id, **{cache_kwarg(model): cache})
    return out[0, len(ids):].tolist()
