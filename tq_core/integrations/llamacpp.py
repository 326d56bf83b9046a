"""llama.cpp through llama-cpp-python's low-level bindings of ``llama.h``: one model per GGUF file,
one context per cache, token ids in, logits out.

A context (``LlamaCache``) is llama.cpp's own inference state: its KV cache holds K and V of every
layer in the context's ggml types (``type_k``/``type_v``, what ``--cache-type-k/-v`` set), in
``n_ctx`` cells allocated when the context is made. Every context runs flash attention (llama.cpp
reads a quantized V cache only through it), so an f16 context and a quantized one differ only in
the cache types. Feeding ids writes their K/V into the cache first, then attends over the cache:
each fed token reads its own stored (rounded) K/V, as llama.cpp's generation does.

Ids are always fed as ids: the harness tokenizes with the model's HF tokenizer on every host, and
llama.cpp's own tokenizer (``LlamaModel.tokenize``) is there only to check that the two agree.
Imported lazily: nothing here loads ``llama_cpp`` until a model is loaded.
"""

from __future__ import annotations

import pathlib
import weakref

import numpy as np

_READY: list = []


def _lib():
    """``llama_cpp``, with llama.cpp's own log lines (every context's setup) silenced but errors."""
    import llama_cpp

    if not _READY:
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        llama_cpp.llama_backend_init()
        _READY.append(True)
    return llama_cpp


def version() -> str:
    return _lib().__version__


def ggml_type_id(name: str) -> int:
    """llama_cpp's id of the ggml type ``name`` (e.g. "q4_0" -> ``llama_cpp.GGML_TYPE_Q4_0``)."""
    lib = _lib()
    value = getattr(lib, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise ValueError(f"ggml type {name!r} is not known to llama-cpp-python {lib.__version__}")
    return int(value)


class LlamaModel:
    """A GGUF file loaded by llama.cpp on the CPU, weights as the file stores them (a Q4_1 file
    computes with Q4_1 weights)."""

    def __init__(self, path: str | pathlib.Path):
        lib = _lib()
        self.path = pathlib.Path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0  # the host measures llama.cpp on the CPU, like the torch-cpu host
        self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load {self.path} (is it a GGUF of an architecture "
                             f"llama-cpp-python {lib.__version__} knows?)")
        self._free = weakref.finalize(self, lib.llama_model_free, self.ptr)
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (llama.cpp's end-of-generation tokens)."""
        return bool(_lib().llama_vocab_is_eog(self.vocab, int(token)))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (special tokens in the text are not parsed)."""
        lib = _lib()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        while True:
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, False)
            if n >= 0:
                return list(buf[:n])
            cap = -n  # the buffer was short: llama.cpp says how many it needs

    def close(self) -> None:
        self._free()


class LlamaCache:
    """One llama.cpp context (batch 1, sequence 0): a KV cache of ``n_ctx`` cells in ``type_k`` /
    ``type_v`` (ggml type names), flash attention on, ``threads`` CPU threads.

    ``n_past`` tokens are held; ``decode`` appends ids after them."""

    def __init__(self, model: LlamaModel, type_k: str = "f16", type_v: str = "f16", n_ctx: int = 0,
                 threads: int = 1, n_batch: int = 512):
        lib = _lib()
        self.model, self.type_k, self.type_v, self.threads = model, type_k, type_v, threads
        p = lib.llama_context_default_params()
        p.n_ctx = max(int(n_ctx), 1)
        self.n_batch = min(n_batch, p.n_ctx)
        p.n_batch = p.n_ubatch = self.n_batch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = threads
        p.type_k, p.type_v = ggml_type_id(type_k), ggml_type_id(type_v)
        if "flash_attn_type" in {f[0] for f in type(p)._fields_}:
            p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        else:
            p.flash_attn = True  # llama.cpp before its flash_attn_type enum
        p.swa_full = True  # sliding-window layers hold every token too: all layers hold n_past
        p.no_perf = True
        ctx = lib.llama_init_from_model(model.ptr, p)
        if not ctx:
            raise ValueError(f"llama.cpp refused a context with K cache {type_k}, V cache {type_v}, "
                             f"n_ctx {p.n_ctx}, flash attention on")
        batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.ctx, self.batch = ctx, batch
        self._free = weakref.finalize(self, _free_context, lib, ctx, batch, model)
        self.n_ctx = int(lib.llama_n_ctx(ctx))
        self.n_past = 0

    def set_threads(self, n: int) -> None:
        if n != self.threads:
            _lib().llama_set_n_threads(self.ctx, n, n)
            self.threads = n

    def decode(self, ids, last_only: bool = False) -> np.ndarray:
        """Feed ``ids`` after the ``n_past`` held tokens; float32 logits (len(ids), vocab) of the fed
        positions (only the last row with ``last_only``), copied out of llama.cpp."""
        lib = _lib()
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("ids must hold at least one token id")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"the context holds {self.n_past} of {self.n_ctx} tokens: {len(ids)} more do not fit "
                             f"(make the cache with reserve >= {self.n_past + len(ids)})")
        out = []
        b = self.batch
        for s in range(0, len(ids), self.n_batch):
            piece = ids[s:s + self.n_batch]
            last = s + len(piece) == len(ids)
            b.n_tokens = len(piece)
            for i, t in enumerate(piece):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, self.n_past + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = not last_only or (last and i == len(piece) - 1)
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at position {self.n_past} (n_ctx {self.n_ctx})")
            self.n_past += len(piece)
            if not last_only or last:
                rows = 1 if last_only else len(piece)
                ptr = lib.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(rows, self.model.n_vocab)).copy())
        return np.concatenate(out, axis=0) if len(out) > 1 else out[0]

    def state_size(self) -> int:
        """Bytes llama.cpp serializes for sequence 0 (``llama_state_seq_get_size``): the held
        tokens' K and V rows of every layer, plus per-cell and per-layer headers."""
        return int(_lib().llama_state_seq_get_size(self.ctx, 0))

    def close(self) -> None:
        self._free()


def _free_context(lib, ctx, batch, model) -> None:
    # The model is an argument only to keep it alive until its contexts are freed.
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)


def new_cache(model: LlamaModel, type_k: str = "f16", type_v: str = "f16", n_ctx: int = 0,
              threads: int = 1) -> LlamaCache:
    """A llama.cpp context with room for ``n_ctx`` tokens (0: 4096, or the model's trained context
    if it is shorter)."""
    if not n_ctx:
        n_ctx = min(4096, int(_lib().llama_model_n_ctx_train(model.ptr)))
    return LlamaCache(model, type_k, type_v, n_ctx=n_ctx, threads=threads)


def greedy(cache: LlamaCache, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy-decode up to ``max_new_tokens`` after ``ids`` (stops after an end-of-generation token);
    the new ids. As transformers' ``generate`` does, the last new token is never fed, so the
    cache then holds ``len(ids) + len(new) - 1`` tokens."""
    logits = cache.decode(ids, last_only=True)
    new: list[int] = []
    while True:
        token = int(np.argmax(logits[-1]))
        new.append(token)
        if len(new) == max_new_tokens or cache.model.is_eog(token):
            return new
        logits = cache.decode([token], last_only=True)
