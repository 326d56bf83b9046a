"""The mlx-lm host: MLX on Metal (Apple silicon) or on CPU (Linux)."""

from __future__ import annotations

import contextlib

import numpy as np

from ..blas import use_openblas

use_openblas()  # the harness picks MLX's BLAS before mlx.core first loads (Linux CPU: harness/blas.py)

import mlx.core as mx  # noqa: E402

from tq_core.integrations import mlx_lm  # noqa: E402

from mlx_lm.models.cache import QuantizedKVCache  # noqa: E402

from . import Model, check_shape_only, check_sliding, peer_method, tensor_bytes  # noqa: E402


class MLXHost:
    lib = "mlx"
    backend = "mlx"

    def __init__(self):
        self.float16, self.float32, self.bfloat16 = mx.float16, mx.float32, mx.bfloat16

    # ---- models ---------------------------------------------------------------------------------
    def load(self, source=None, dtype=None) -> Model:
        from tq_core import models

        from ..identity import geometry

        from tq_core.greedy import hf_tokenizer

        model, wrapper = models.load_mlx(source)
        # Compressed caches are read over their codes, as a patched model reads them; mlx-lm's own
        # cache passes through to its attention exactly as before.
        mlx_lm.enable_attention(model)
        return Model(model, hf_tokenizer(wrapper), wrapper, geometry(model.args), None if source is None else str(source))

    def tokenize(self, m: Model, text: str) -> list[int]:
        """``text`` as the model reads a document: its tokenizer's leading special tokens (BOS), then the text."""
        from tq_core.greedy import text_ids

        return text_ids(m.tokenizer, text)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, m: Model, config=None, simulate: bool = False, reserve: int = 0, attention: str = "auto"):
        if config is None:
            return mlx_lm.baseline_cache(m.model)
        peer = peer_method(config, simulate)
        if peer is not None:  # another project's cache, as mlx-lm builds it (grows by itself)
            return peer.make_cache(self.lib, m.model, config)
        check_sliding(config, mlx_lm.sliding_layers(m.model), m.source or "this model")
        return mlx_lm.make_cache(m.model, config, simulate=simulate, reserve=reserve, attention=attention)

    def shape_cache(self, layers: int, config=None, reserve: int = 0):
        if config is None:
            return [mlx_lm.KVCache() for _ in range(layers)]
        check_shape_only(config)
        return [mlx_lm.TurboQuantMLXCache(config, i, reserve=reserve) for i in range(layers)]

    def update(self, cache, layer: int, k, v):
        return cache[layer].update_and_fetch(k, v)

    def stores(self, cache) -> list:
        return [c.store for c in cache if isinstance(c, mlx_lm.TurboQuantMLXCache) and c.store is not None]

    def layer_kv(self, cache) -> list:
        out = []
        for c in cache:
            if isinstance(c, mlx_lm.TurboQuantMLXCache) or getattr(c, "keys", None) is None:
                out.append(None)
            else:
                out.append(c.keys_and_values() if hasattr(c, "keys_and_values") else
                           (c.keys[..., :c.offset, :], c.values[..., :c.offset, :]))
        return out

    def fork(self, m: Model, base_cache, config, upto: int | None = None, reserve: int = 0):
        cache = self.new_cache(m, config, reserve=reserve)
        for i, (c, kv) in enumerate(zip(cache, self.layer_kv(base_cache))):
            if kv is None:
                raise ValueError(f"layer {i} of the baseline cache holds nothing to fork from")
            k, v = kv
            c.update_and_fetch(k[..., :upto, :], v[..., :upto, :])
        mx.eval([c.state for c in cache])
        return cache

    def held_bytes(self, cache) -> dict:
        """mlx-lm's own ``KVCache`` allocates in steps of 256 tokens; its bytes are the allocation.
        So does its ``QuantizedKVCache`` (a peer): counted from its (codes, scales, biases) arrays of
        keys and values, their allocation, as ``codes``, ``scales`` and ``zeros``; ``encoded``: the
        most tokens a layer holds quantized (all it holds)."""
        parts, channels = {"uncompressed": 0}, 0
        tokens = max((int(c.offset) for c in cache), default=0)
        quantized = [c for c in cache if isinstance(c, QuantizedKVCache) and c.keys is not None]
        if quantized:
            seen = set()
            parts.update(codes=0, scales=0, zeros=0)
            for c in quantized:
                for part, n in tensor_bytes({"codes": [c.keys[0], c.values[0]], "scales": [c.keys[1], c.values[1]],
                                             "zeros": [c.keys[2], c.values[2]]}, seen).items():
                    parts[part] += n
                # mx.quantize packs bits-bit codes into uint32 words: channels from the packed width
                channels += c.keys[0].shape[1] * (c.keys[0].shape[-1] + c.values[0].shape[-1]) * 32 // c.bits
        for c in cache:
            if isinstance(c, QuantizedKVCache):
                continue
            if isinstance(c, mlx_lm.TurboQuantMLXCache):
                if c.store is None:
                    continue
                for part, n in c.nbytes_parts().items():
                    parts[part] = parts.get(part, 0) + n
                channels += c.store.kv_heads * (c.store.codec_k.dim + c.store.codec_v.dim)
            elif getattr(c, "keys", None) is not None:
                parts["uncompressed"] += int(c.nbytes)
                channels += c.keys.shape[1] * (c.keys.shape[-1] + c.values.shape[-1])
        held = {"parts": parts, "tokens": tokens, "channels": channels}
        if quantized:
            held["encoded"] = max(int(c.offset) for c in quantized)
        return held

    # ---- running --------------------------------------------------------------------------------
    def forward(self, m: Model, ids, cache, last_only: bool = False):
        """Logits (T, vocab) of feeding ``ids`` through ``cache`` (batch 1); evaluated."""
        x = ids if isinstance(ids, mx.array) else mx.array([list(ids)])
        logits = m.model(x, cache=cache)[0]
        if last_only:
            logits = logits[-1:]
        mx.eval(logits)
        return logits

    def log_softmax(self, logits) -> np.ndarray:
        """float32 log-probs normalized in float64 (see ``harness.scoring``)."""
        from ..scoring import log_softmax

        return log_softmax(np.array(logits.astype(mx.float32)))

    def argmax(self, logits) -> int:
        return int(mx.argmax(logits[-1]).item())

    def holds_window_exactly(self, m: Model) -> bool:
        """Whether a compressed cache holds this model's sinks and window exactly as computed: they
        are held in 16 bits, so only a 16-bit model's are exact."""
        from mlx.utils import tree_flatten

        return tree_flatten(m.model.parameters())[0][1].dtype in (mx.float16, mx.bfloat16)

    def greedy_held(self, prompt: int, new: int) -> int:
        """Tokens a cache holds after a greedy generation of ``new`` tokens: mlx-lm's stream_generate feeds every token it makes, the last one included."""
        return prompt + new

    def greedy(self, m: Model, ids: list[int], cache, max_new_tokens: int) -> list[int]:
        return mlx_lm.greedy(m.model, m.native, ids, cache, max_new_tokens)

    # ---- arrays and clocks ----------------------------------------------------------------------
    def from_numpy(self, x: np.ndarray, dtype=None):
        a = mx.array(x)
        return a if dtype is None else a.astype(dtype)

    def to_numpy(self, x) -> np.ndarray:
        if mx.issubdtype(x.dtype, mx.floating):
            return np.array(x.astype(mx.float32)).astype(np.float64)
        return np.array(x)

    def randn(self, shape, dtype=None):
        x = mx.random.normal(tuple(shape)).astype(dtype or self.float32)
        mx.eval(x)
        return x

    def empty(self, shape, dtype=None):
        return mx.zeros(tuple(shape), dtype=dtype or self.float32)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def gpu_time(self, fn, rounds: int = 20, warmup: int = 3) -> float | None:
        """No graph replay for MLX: the call's wall time (with ``mx.eval``) is what counts."""
        return None

    def cat(self, xs, axis: int):
        return mx.concatenate(xs, axis=axis)

    def sdpa_backends(self) -> tuple:
        return ("default",)

    def sdpa(self, q, k, v, scale: float, backend: str = "default"):
        """MLX's fused attention (one implementation: ``backend`` is accepted for the host interface)."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    def sync(self, *arrays) -> None:
        """Evaluate ``arrays`` (MLX is lazy: nothing runs until then)."""
        flat = []
        for a in arrays:
            if isinstance(a, (list, tuple)):
                flat.extend(x for x in a if x is not None)
            elif a is not None:
                flat.append(a)
        mx.eval(*flat)

    def cache_state(self, cache) -> list:
        return [a for c in cache for a in c.state]

    def reset_peak(self) -> None:
        mx.reset_peak_memory()

    def peak(self) -> int | None:
        return int(mx.get_peak_memory())

    def free(self) -> None:
        mx.clear_cache()

    @contextlib.contextmanager
    def threads(self, n: int):
        yield

    def thread_count(self) -> int | None:
        return None

    def device_name(self) -> str:
        return f"mlx {mx.default_device()}"

    def on_cpu(self) -> bool:
        return "cpu" in str(mx.default_device()).lower()

    @property
    def slow_cpu_backend(self) -> bool:
        """MLX on a CPU: encodes ~0.1 M vectors/s and steps a model 2-4x slower than torch there, so
        the default tier keeps its share small (everything runs nightly)."""
        return self.on_cpu()

    def gemm_gflops(self) -> float:
        """fp32 GEMM rate here, best of 3: which BLAS MLX runs on (the Linux ``mlx[cpu]`` wheel's
        reference BLAS ~1 GFLOP/s on a 2-core VM; a system OpenBLAS, see ``harness.blas``, 40-170)."""
        import time

        a, w = self.randn((256, 576)), self.randn((576, 1536))
        self.sync(a @ w)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            self.sync(a @ w)
            best = min(best, time.perf_counter() - t0)
        return 2 * 256 * 576 * 1536 / best / 1e9

    def versions(self) -> dict:
        """Installed versions of the host library's distributions (recorded beside goldens)."""
        import importlib.metadata as md

        return {d: md.version(d) for d in ("mlx", "mlx-lm")}

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)
