"""Memory: bytes the compressed cache holds, measured from its tensors, vs the formula and vs fp16.

K/V of each model's geometry are written into the real cache objects (through the backend's host:
transformers Cache for torch, mlx-lm caches for mlx) layer by layer; the weights do not change how many bytes a cache
holds, so shape-only models stand in for large ones. Peak allocator memory is recorded where the
backend reports it (CUDA, MLX).
"""

from __future__ import annotations

import pytest

from fixtures import configs as config_registry
from fixtures import models as registry
from suites import gates

CONTEXTS = {"default": [1024, 4096], "nightly": [1024, 4096, 16384, 32768]}


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "context" in metafunc.fixturenames:
        metafunc.parametrize("context", CONTEXTS[tier], ids=lambda v: f"context={v}")
    if "spec" in metafunc.fixturenames:
        # The real model of the run (--tq-model, else the default) first, then the shape-only ones.
        models = [registry.real_spec(metafunc.config.getoption("--tq-model"))] + registry.SHAPES
        specs = models if tier == "nightly" else models[:2]
        metafunc.parametrize("spec", specs, ids=lambda s: f"model={s.name}")


def formula_bytes(spec, config, tokens: int, fp_bytes: int, codec_k, codec_v) -> int:
    """What the layout should hold: the method's fields per encoded token (from its codecs' declared
    field shapes), full precision sinks/window."""
    fp_tokens = min(tokens, config.sinks + config.window)
    enc = tokens - fp_tokens
    per_vec = sum(field_bytes(c) for c in (codec_k, codec_v))
    return spec.layers * spec.kv_heads * (enc * per_vec + fp_tokens * spec.head_dim * 2 * fp_bytes)


def field_bytes(codec) -> int:
    """Bytes one encoded vector takes, by the codec's declared fields."""
    import numpy as np

    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in codec.fields().values())


def fill(host, spec, config, tokens, chunk=1024):
    """Fill a fresh cache of ``spec``'s geometry (compressed, or the host library's own when config
    is None) with ``tokens`` random fp16 K/V tokens; return (bytes held, peak allocator bytes, cache).

    The compressed cache is reserved for ``tokens`` (what a serving stack that knows the context
    preallocates), so what it holds is exactly its layout."""
    cache = host.shape_cache(spec.layers, config, reserve=tokens if config is not None else 0)
    host.reset_peak()
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        for layer in range(spec.layers):
            k = host.randn((1, spec.kv_heads, n, spec.head_dim), host.float16)
            host.update(cache, layer, k, k * 0.5)
            host.sync(host.cache_state(cache))
    held = sum(host.held_bytes(cache)["parts"].values())
    return held, host.peak(), cache


@pytest.mark.parametrize("variant", ["default", "plain"], ids=lambda v: f"variant={v}")
def test_bytes_held(host, spec, context, variant, record, request):
    if request.config.getoption("--tq-tier") == "default" and host.slow_cpu_backend and spec.kind == "shape":
        # MLX on CPU encodes ~0.1 M vectors/s: a 32-layer 4k fill alone takes minutes.
        pytest.skip("default tier on MLX/CPU: the real model's geometry only; --tq-tier nightly runs every shape")

    config = config_registry.DEFAULT if variant == "default" else config_registry.PLAIN
    held, peak, cache = fill(host, spec, config, context)
    base, base_peak, _ = fill(host, spec, None, context)
    store = host.stores(cache)[0]
    fp16 = spec.fp16_bytes_per_token * context
    expect = formula_bytes(spec, config, context, 2, store.codec_k, store.codec_v)
    labels = dict(config=config.label, model=spec.name)
    record("bytes_held", held, "B", **labels)
    record("bytes_formula", expect, "B", **labels)
    record("bytes_fp16_cache", base, "B", **labels)
    record("ratio_vs_fp16", held / fp16, "x", **labels)
    record("bytes_per_token_per_head", held / (context * spec.layers * spec.kv_heads), "B", **labels)
    record("bits_per_channel", held * 8 / (context * spec.layers * spec.kv_heads * spec.head_dim * 2), "bit", **labels)
    if peak is not None:
        record("peak_alloc", peak, "B", **labels)
        record("peak_alloc_fp16_cache", base_peak, "B", **labels)
    # The baseline holds exactly fp16 K and V; the compressed cache exactly its layout, and its codes
    # are packed at the config's bits (whatever fields a method declares, a b-bit code takes b bits).
    assert base == fp16
    assert held == expect, f"cache holds {held} B, layout says {expect} B"
    check_packed_codes(host, cache, spec, config, context)
    gates.check_memory(config, held / fp16, context)


def check_packed_codes(host, cache, spec, config, tokens: int) -> None:
    """The ``codes`` part holds exactly ceil(dim / 8) * bits bytes per encoded vector, K and V."""
    from tq_core import packing

    enc = max(0, tokens - config.sinks - config.window)
    per_vec = packing.packed_size(spec.head_dim, config.bits_k) + packing.packed_size(spec.head_dim, config.bits_v)
    codes = host.held_bytes(cache)["parts"].get("codes", 0)
    expect = spec.layers * spec.kv_heads * enc * per_vec
    assert codes == expect, (f"{config.label}: codes hold {codes} B, {expect} B at {config.bits_k}/{config.bits_v} bits "
                             "per channel: the codes are not packed to their bits")
