"""Sliding-window layers in mlx-lm (a random 4-layer Gemma-3 text model, window 8): held as mlx-lm
holds them by default (its ``RotatingKVCache``), or encoded and bounded to their window with
``sw=codes``, which the model's own sliding mask then reads, over the codes or the reference path.
The same choices as the transformers cache (tests/test_hf_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest

HINT = "mlx-lm not installed: pip install 'tq-core[mlx-cpu]'"
mx = pytest.importorskip("mlx.core", reason=HINT)
pytest.importorskip("mlx_lm", reason=HINT)

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.models import gemma3_text  # noqa: E402
from mlx_lm.models.cache import KVCache, RotatingKVCache  # noqa: E402

import tq_core  # noqa: E402
from tq_core import CacheConfig  # noqa: E402
from tq_core.integrations import mlx_lm as tqm  # noqa: E402

pytestmark = pytest.mark.mlx
WINDOW = 8


@pytest.fixture(scope="module")
def model():
    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                                 num_attention_heads=4, head_dim=32, vocab_size=128, num_key_value_heads=2,
                                 query_pre_attn_scalar=32, sliding_window=WINDOW, sliding_window_pattern=2)
    mx.random.seed(0)
    m = gemma3_text.Model(args)
    # Larger query weights than the init's, so that attention is peaked and a wrong mask shows.
    m.update(tree_unflatten([(k, v * 4) for k, v in tree_flatten(m.parameters()) if k.endswith("q_proj.weight")]))
    mx.eval(m.parameters())
    return m


def _logits(model, cache, ids: list[int], prefill: int) -> np.ndarray:
    """Logits of a prefill of ``prefill`` tokens, then one token per call (decode semantics), (T', vocab)."""
    out = [model(mx.array([ids[:prefill]]), cache=cache)[0, -1:]]
    for t in range(prefill, len(ids)):
        out.append(model(mx.array([ids[t:t + 1]]), cache=cache)[0])
    x = mx.concatenate(out)
    mx.eval(x)
    return np.array(x.astype(mx.float32))


IDS = [int(i) for i in np.random.default_rng(1).integers(3, 128, 40)]


def test_sliding_layers_kept_as_mlx_lm_holds_them_by_default(model):
    cache = tqm.make_cache(model, CacheConfig(bits_k=4, bits_v=2, sinks=2, window=4))
    assert [type(c) for c in cache] == [RotatingKVCache, tqm.TurboQuantMLXCache] * 2
    assert [type(c) for c in tqm.baseline_cache(model)] == [RotatingKVCache, KVCache] * 2
    _logits(model, cache, IDS, 20)
    assert [c.store.held for c in cache[1::2]] == [40, 40]


def test_sliding_layers_as_codes_hold_only_their_window(model):
    cache = tqm.make_cache(model, CacheConfig(bits_k=4, bits_v=2, sinks=2, window=4, sliding="codes"))
    assert all(type(c) is tqm.TurboQuantMLXCache for c in cache)
    assert [c.span for c in cache] == [WINDOW, 0, WINDOW, 0]
    _logits(model, cache, IDS, 20)
    assert [c.store.held for c in cache] == [WINDOW - 1, 40, WINDOW - 1, 40]
    assert [c.store.encoded_tokens for c in cache] == [3, 34, 3, 34]
    assert cache[0].store.sink_k is None


def test_sliding_layers_as_codes_in_full_precision_match_the_library_cache(model):
    """With everything inside the full-precision window, the reference path reproduces mlx-lm's own
    cache (rotating sliding layers) exactly: the sliding mask reads exactly the positions held.
    bfloat16 model: the window holds its K/V exactly."""
    import copy

    m16 = copy.deepcopy(model)
    m16.set_dtype(mx.bfloat16)
    config = CacheConfig(bits_k=4, bits_v=2, sinks=0, window=1000, sliding="codes")
    got = _logits(m16, tqm.make_cache(m16, config), IDS, 20)
    np.testing.assert_array_equal(got, _logits(m16, tqm.baseline_cache(m16), IDS, 20))


# float32 model, fast path vs reference path: measured up to 1.04e-3 on logits of magnitude ~4 (the
# two paths' float32 rounding differs by ~1e-6 per layer, which flips bfloat16 roundings of the
# window K/V stored at each step, and the peaked random attention amplifies that); the codes alone
# move them by up to 4.5 (K3V2+s2w3).
FAST_ATOL = 4e-3


@pytest.mark.parametrize("label", ["K4V2+s0w1000+sw=codes", "K3V2+s2w3+sw=codes"])
def test_sliding_layers_as_codes_fast_path_matches_reference_path(model, label):
    config = CacheConfig.parse(label)
    reference = _logits(model, tqm.make_cache(model, config), IDS, 20)
    tq_core.patch(model, config=config)
    try:
        fast = _logits(model, tqm.make_cache(model, config), IDS, 20)
    finally:
        tq_core.unpatch(model)
    assert np.abs(fast - reference).max() < FAST_ATOL
    if config.window < WINDOW:  # the codes matter: not the logits of the uncompressed cache
        effect = np.abs(reference - _logits(model, tqm.baseline_cache(model), IDS, 20)).max()
        assert effect > 10 * FAST_ATOL, effect
