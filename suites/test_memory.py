"""Memory: bytes the compressed cache holds, measured from its tensors, vs the formula and vs fp16.

K/V of each model's geometry are written into the real cache objects (transformers Cache for
torch, mlx-lm caches for mlx) layer by layer; the weights do not change how many bytes a cache
holds, so shape-only models stand in for large ones. Peak allocator memory is recorded where the
backend reports it (CUDA, MLX).
"""

from __future__ import annotations

import pytest

from fixtures import models as registry
from fixtures import targets
from suites import gates
from tq_core import packing

CONTEXTS = {"default": [1024, 4096], "nightly": [1024, 4096, 16384, 32768]}
MODELS = [registry.DEFAULT_REAL] + registry.SHAPES


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "context" in metafunc.fixturenames:
        metafunc.parametrize("context", CONTEXTS[tier], ids=lambda v: f"context={v}")
    if "spec" in metafunc.fixturenames:
        specs = MODELS if tier == "nightly" else MODELS[:2]
        metafunc.parametrize("spec", specs, ids=lambda s: f"model={s.name}")


def formula_bytes(spec, config, tokens: int, fp_bytes: int) -> int:
    """What the layout should hold: codes + fp16 norms per encoded token, full precision sinks/window."""
    fp_tokens = min(tokens, config.sinks + config.window)
    enc = tokens - fp_tokens
    per_vec = packing.packed_size(spec.head_dim, config.bits_k) + packing.packed_size(spec.head_dim, config.bits_v) + 4
    return spec.layers * spec.kv_heads * (enc * per_vec + fp_tokens * spec.head_dim * 2 * fp_bytes)


def fill(backend, spec, config, tokens, chunk=1024):
    """Fill a fresh cache (compressed, or the baseline when config is None); return (bytes held, peak)."""
    if targets.lib(backend) == "mlx":
        import mlx.core as mx

        from tq_core.integrations import mlx_lm

        caches = ([mlx_lm.TurboQuantMLXCache(config, i) for i in range(spec.layers)] if config
                  else [mlx_lm.KVCache() for _ in range(spec.layers)])
        mx.reset_peak_memory()
        for s in range(0, tokens, chunk):
            n = min(chunk, tokens - s)
            for c in caches:
                k = mx.random.normal((1, spec.kv_heads, n, spec.head_dim)).astype(mx.float16)
                c.update_and_fetch(k, k * 0.5)
                mx.eval(c.state)
        return sum(c.nbytes for c in caches), mx.get_peak_memory()
    import torch

    from tq_core.integrations import hf

    dev = targets.torch_device(backend)
    cache = hf.TurboQuantCache(config=config) if config else hf._cu.DynamicCache()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        for layer in range(spec.layers):
            k = torch.randn(1, spec.kv_heads, n, spec.head_dim, dtype=torch.float16, device=dev)
            cache.update(k, k * 0.5, layer)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return hf.cache_nbytes(cache), peak


@pytest.mark.parametrize("variant", ["default", "plain"], ids=lambda v: f"variant={v}")
def test_bytes_held(backend, spec, context, variant, record, request):
    from fixtures.configs import CONFIGS, PLAIN

    if (request.config.getoption("--tq-tier") == "default" and targets.lib(backend) == "mlx"
            and spec.kind == "shape" and "gpu" not in targets.device_name(backend)):
        # MLX on CPU encodes ~0.1 M vectors/s: a 32-layer 4k fill alone takes minutes.
        pytest.skip("default tier on MLX/CPU: the real model's geometry only; --tq-tier nightly runs every shape")

    config = CONFIGS["K4V2"] if variant == "default" else PLAIN["K4V2-plain"]
    held, peak = fill(backend, spec, config, context)
    base, base_peak = fill(backend, spec, None, context)
    fp16 = spec.fp16_bytes_per_token * context
    expect = formula_bytes(spec, config, context, fp_bytes=2)
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
    # The baseline holds exactly fp16 K and V; the compressed cache exactly its layout.
    assert base == fp16
    assert held == expect, f"cache holds {held} B, layout says {expect} B"
    gates.check_memory(config, held / fp16, context)
