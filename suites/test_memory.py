"""Memory: bytes the compressed cache holds, measured from its tensors, vs the formula and vs fp16.

K/V of each model's geometry are written into the real cache objects (through the backend's host:
transformers Cache for torch, mlx-lm caches for mlx) layer by layer; the weights do not change how
many bytes a cache holds, so shape-only models stand in for large ones. The run's real model
(``--tq-model``, else the default) is measured through the caches its host builds for it, so its
layer types count: sliding-window layers are held encoded, bounded to their window, with
``sw=codes`` (``CacheConfig.sliding``) and held to that layout; layers the cache keeps uncompressed
(sliding window by default, chunked attention) are filled like the others and held by the host
library's own layers; they are counted in bytes held (part ``uncompressed``) and must hold exactly
what the library's own cache holds for them. Layers
that take no K/V (linear attention, shared KV) are not filled. Peak allocator memory is recorded
where the backend reports it (CUDA, MLX).

Labels: ``model`` (the spec's id), ``config``; ``layers_compressed`` / ``layers_uncompressed``
(how many layers the cache encodes, and how many it keeps as the library does).

A peer's cache (another project's, ``tq_core.methods``) is measured on the real model only, as its
host library builds it (shape-only models have no model to build it for: skipped), and counted
from its own tensors by part (codes, scales, zeros, residual); its library decides its layout, so
there is no formula to hold it to.
"""

from __future__ import annotations

import pytest

from fixtures import models as registry
from harness.hosts import peer_method
from harness.identity import FULL_ATTENTION
from suites import gates
from tq_core.kvstore import BLOCK

CONTEXTS = {"default": [1024, 4096], "nightly": [1024, 4096, 16384, 32768]}
# Layer types whose cache layers take K/V (a cache compresses the first; a host library may keep the
# others as its own sliding layers). Any other type (linear attention, shared KV, ...) is not filled.
KV_LAYER_TYPES = (FULL_ATTENTION, "sliding_attention", "chunked_attention")


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "context" in metafunc.fixturenames:
        metafunc.parametrize("context", CONTEXTS[tier], ids=lambda v: f"context={v}")
    if "spec" in metafunc.fixturenames:
        # The real model of the run (--tq-model, else the default) first, then the shape-only ones.
        models = [registry.real_spec(metafunc.config.getoption("--tq-model"))] + registry.SHAPES
        specs = models if tier == "nightly" else models[:2]
        metafunc.parametrize("spec", specs, ids=lambda s: f"model={s.name}")


def formula_bytes(spec, config, tokens: int, fp_bytes: int, codec_k, codec_v, layers: int | None = None,
                  spans: list[int] | None = None) -> int:
    """What the layout should hold in ``layers`` compressed layers (default: all of ``spec``): the
    method's fields per encoded token (from its codecs' declared field shapes), full precision
    sinks/window, and with centered keys (``c=1``) one float32 key center per KV head once a token
    is encoded. ``spans``: each compressed layer's sliding window (0: full attention), which
    bounds what it holds (``held_tokens``)."""
    per_vec = sum(field_bytes(c) for c in (codec_k, codec_v))
    centered = config.centers_keys
    spans = [0] * (spec.layers if layers is None else layers) if spans is None else spans
    total = 0
    for span in spans:
        fp_tokens, enc = held_tokens(config, tokens, span)
        total += spec.kv_heads * (enc * per_vec + fp_tokens * spec.head_dim * 2 * fp_bytes)
        if centered and tokens > config.sinks + window_tokens(config, span):  # a token was encoded
            total += spec.kv_heads * spec.head_dim * 4
    return total


def window_tokens(config, span: int = 0) -> int:
    """Positions a layer's window holds once full: the config's window, at most ``span - 1`` in a
    sliding-window layer of ``span``."""
    return min(config.window, span - 1) if span else config.window


def held_tokens(config, tokens: int, span: int = 0) -> tuple[int, int]:
    """(full-precision, encoded) positions a layer holds after ``tokens``: all of them in a
    full-attention layer (sinks and window in full precision); in a sliding-window layer of
    ``span``, the last ``span - 1`` (the window in full precision, and the sinks while among them)."""
    if span:
        held = min(tokens, span - 1)
        sinks = max(0, min(tokens, config.sinks) - max(0, tokens - (span - 1)))
        fp = min(held, sinks + window_tokens(config, span))
    else:
        held = tokens
        fp = min(tokens, config.sinks + window_tokens(config))
    return fp, held - fp


def field_bytes(codec) -> int:
    """Bytes one encoded vector takes, by the codec's declared fields."""
    import numpy as np

    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in codec.fields().values())


def kv_layers(spec) -> list[int]:
    """Layers that take K/V: every layer of a shape model, the attention layers of a real one."""
    return [i for i, t in enumerate(spec.types) if t in KV_LAYER_TYPES]


def fill(host, spec, config, tokens, chunk=1024, m=None):
    """Fill a fresh cache of ``spec``'s geometry (compressed, or the host library's own when config
    is None) with ``tokens`` random fp16 K/V tokens in every layer that takes K/V; return (bytes
    held, peak allocator bytes, cache). ``m``: the loaded real model, whose host builds its
    caches (layer types included); None: a shape-only cache, every layer alike.

    The compressed cache is reserved for ``tokens`` (what a serving stack that knows the context
    preallocates), so what it holds is exactly its layout."""
    reserve = tokens if config is not None else 0
    cache = host.shape_cache(spec.layers, config, reserve=reserve) if m is None else (
        host.new_cache(m, config, reserve=reserve))
    host.reset_peak()
    layers = kv_layers(spec)
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        for layer in layers:
            k = host.randn((1, spec.kv_heads, n, spec.head_dim), host.float16)
            host.update(cache, layer, k, k * 0.5)
            host.sync(host.cache_state(cache))
    return sum(host.held_bytes(cache)["parts"].values()), host.peak(), cache


@pytest.mark.parametrize("variant", ["default", "plain", "sliding"], ids=lambda v: f"variant={v}")
def test_bytes_held(host, spec, context, variant, record, request, headline):
    """``variant``: the run's headline config; ``plain``: its codes alone (no sinks, no window);
    ``sliding``: its sliding-window layers encoded too (``sw=codes``; models that have such layers)."""
    if request.config.getoption("--tq-tier") == "default" and host.slow_cpu_backend and spec.kind == "shape":
        # MLX on CPU encodes ~0.1 M vectors/s: a 32-layer 4k fill alone takes minutes.
        pytest.skip("default tier on MLX/CPU: the real model's geometry only; --tq-tier nightly runs every shape")
    if variant == "sliding" and ("sliding_attention" not in spec.types or peer_method(headline) is not None):
        pytest.skip(f"{spec.name} has no sliding-window layers" if peer_method(headline) is None else
                    f"{headline.label} is a peer's cache: its library decides how sliding layers are held")
    m = request.getfixturevalue("load_model")(host.backend) if spec.kind == "real" else None
    if m is not None:
        request.getfixturevalue("model_info")  # the run records which model was measured

    config = {"default": headline, "plain": headline.replace(sinks=0, window=0),
              "sliding": headline.replace(sliding="codes")}[variant]
    held, peak, cache = fill(host, spec, config, context, m=m)
    base, base_peak, _ = fill(host, spec, None, context, m=m)
    parts = host.held_bytes(cache)["parts"]
    if peer_method(config) is not None:
        record_peer(record, spec, config, context, held, base, parts, peak, base_peak)
        return
    stores = host.stores(cache)
    compressed, filled = len(stores), len(kv_layers(spec))
    fp16 = spec.fp16_bytes_per_token * context  # every layer holding every token in fp16
    per_layer_fp16 = spec.kv_heads * context * spec.head_dim * 2 * 2
    # Which layers the cache encodes: every layer that takes K/V, or (a host library that keeps its
    # own sliding layers) exactly the full-attention ones. Anything else is a cache that dropped or
    # invented layers.
    assert compressed in (filled, len(spec.full_layers)) and compressed > 0, (
        f"the compressed cache encodes {compressed} layers; {spec.name} has {len(spec.full_layers)} full-attention "
        f"layers of {filled} that take K/V")
    kept = filled - compressed
    spans = [store.span for store in stores]
    # Layers kept uncompressed hold what the library's own cache holds for them (the baseline holds
    # every token of each full-attention layer, as the compressed layers' tokens).
    expect_uncompressed = base - compressed * per_layer_fp16 if kept else 0
    expect = formula_bytes(spec, config, context, 2, stores[0].codec_k, stores[0].codec_v, spans=spans)
    # Reserved for the context, a full-attention layer has no spare capacity; a sliding-window layer
    # keeps one block spare to drop and compact by (tq_core.kvstore.BLOCK).
    spare_max = sum(1 for span in spans if span) * spec.kv_heads * BLOCK * sum(
        field_bytes(c) for c in (stores[0].codec_k, stores[0].codec_v))
    spare = parts.get("spare", 0)
    labels = dict(config=config.label, model=spec.name, layers_compressed=compressed, layers_uncompressed=kept)
    record("bytes_held", held, "B", **labels)
    record("bytes_formula", expect + expect_uncompressed, "B", **labels)
    record("bytes_fp16_cache", base, "B", **labels)
    record("ratio_vs_fp16", held / base, "x", **labels)
    record("bytes_per_token_per_head", held / (context * spec.layers * spec.kv_heads), "B", **labels)
    record("bits_per_channel", held * 8 / (context * spec.layers * spec.kv_heads * spec.head_dim * 2), "bit", **labels)
    if peak is not None:
        record("peak_alloc", peak, "B", **labels)
        record("peak_alloc_fp16_cache", base_peak, "B", **labels)
    # The baseline holds exactly fp16 K and V (a library's sliding layers fewer tokens); the
    # compressed cache exactly its layout, and its codes are packed at the config's bits (whatever
    # fields a method declares, a b-bit code takes b bits).
    if filled == spec.layers and spec.full_layers == list(range(spec.layers)):
        assert base == fp16, f"the fp16 cache holds {base} B, {fp16} B expected"
    else:  # at least every token of each full-attention layer, at most every token of every layer
        lo = len(spec.full_layers) * per_layer_fp16
        assert lo <= base <= fp16, (
            f"the fp16 cache of a model with {spec.layers - len(spec.full_layers)} layers that are not full "
            f"attention holds {base} B, outside {lo}..{fp16}")
    assert parts.get("uncompressed", 0) == expect_uncompressed, (
        f"{kept} layers kept uncompressed hold {parts.get('uncompressed', 0)} B; the library's own cache "
        f"holds {expect_uncompressed} B for them")
    assert spare <= spare_max, f"the compressed layers hold {spare} B of spare capacity, at most {spare_max} B expected"
    assert held - parts.get("uncompressed", 0) - spare == expect, (
        f"{compressed} compressed layers hold {held - parts.get('uncompressed', 0) - spare} B, layout says {expect} B")
    check_packed_codes(host, cache, spec, config, context, spans=spans)
    status = gates.check_memory(config, held / base, context, head_dim=spec.head_dim, all_compressed=not kept)
    if config.label in gates.MEMORY_RATIO:  # a config with a layout band: did it apply to this geometry?
        record("gate_calibrated", float(status == "calibrated"), "bool", gate="memory", **labels)


def record_peer(record, spec, config, context: int, held: int, base: int, parts: dict, peak, base_peak) -> None:
    """Bytes of a peer's cache (another project's, built by its host library for the real model), from
    its own tensors by part, beside the library's fp16 cache of the same tokens. No layout to check
    it against (the library decides its layout): checked only to hold quantized codes, and less than
    the fp16 cache."""
    labels = dict(config=config.label, model=spec.name)
    record("bytes_held", held, "B", **labels)
    record("bytes_fp16_cache", base, "B", **labels)
    record("ratio_vs_fp16", held / base, "x", **labels)
    record("bytes_per_token_per_head", held / (context * spec.layers * spec.kv_heads), "B", **labels)
    record("bits_per_channel", held * 8 / (context * spec.layers * spec.kv_heads * spec.head_dim * 2), "bit", **labels)
    for part in ("codes", "scales", "zeros", "residual", "centers", "uncompressed"):
        if part in parts:
            record(f"bytes_{part}", parts[part], "B", **labels)
    if peak is not None:
        record("peak_alloc", peak, "B", **labels)
        record("peak_alloc_fp16_cache", base_peak, "B", **labels)
    assert parts.get("codes", 0) > 0, f"{config.label}: the peer's cache holds no quantized codes ({parts})"
    assert held < base, f"{config.label}: the peer's cache holds {held} B, the fp16 cache {base} B"


def check_packed_codes(host, cache, spec, config, tokens: int, spans: list[int] | None = None) -> None:
    """The ``codes`` part holds exactly ceil(dim / 8) * bits bytes per encoded vector, K and V, in
    each compressed layer (``spans``: their sliding windows, 0 for full attention; default: every
    layer of ``spec``, full attention)."""
    from tq_core import packing

    spans = [0] * spec.layers if spans is None else spans
    enc = sum(held_tokens(config, tokens, span)[1] for span in spans)
    per_vec = packing.packed_size(spec.head_dim, config.bits_k) + packing.packed_size(spec.head_dim, config.bits_v)
    codes = host.held_bytes(cache)["parts"].get("codes", 0)
    expect = spec.kv_heads * enc * per_vec
    assert codes == expect, (f"{config.label}: codes hold {codes} B, {expect} B at {config.bits_k}/{config.bits_v} bits "
                             "per channel: the codes are not packed to their bits")
