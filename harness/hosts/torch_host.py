"""The transformers host: torch on CPU or CUDA."""

from __future__ import annotations

import contextlib
import platform

import numpy as np
import torch

from tq_core.integrations import hf

from . import Model, check_shape_only, check_sliding, peer_method, tensor_bytes


def quantized_held(layers: list[dict], tokens: int) -> dict:
    """``held_bytes`` of a peer cache from ``hf.quantized_layers``: its tensors, each storage once."""
    parts, seen = {"codes": 0, "scales": 0, "zeros": 0, "residual": 0}, set()
    for la in layers:
        for part, n in tensor_bytes({"codes": la["quantized"], "residual": la["residual"]}, seen).items():
            parts[part] = parts.get(part, 0) + n
    channels = sum(la["heads"] * sum(la["dims"]) for la in layers)
    encoded = max((la["encoded"] for la in layers), default=0)
    return {"parts": parts, "tokens": tokens, "channels": channels, "encoded": encoded}


class TorchHost:
    lib = "torch"

    def __init__(self, device: str):
        self.device = device
        self.backend = f"torch-{device}"
        self.float16, self.float32, self.bfloat16 = torch.float16, torch.float32, torch.bfloat16

    # ---- models ---------------------------------------------------------------------------------
    def load(self, source=None, dtype=None) -> Model:
        from tq_core import models

        from ..identity import geometry

        model, tok = models.load_hf(source, device=self.device, dtype=dtype)
        # Compressed caches are read over their codes, as a patched model reads them; the host
        # library's own cache still goes through sdpa exactly as before.
        hf.enable_attention(model)
        return Model(model, tok, tok, geometry(model.config), None if source is None else str(source))

    def tokenize(self, m: Model, text: str) -> list[int]:
        """``text`` as the model reads a document: its tokenizer's leading special tokens (BOS), then the text."""
        from tq_core.greedy import text_ids

        return text_ids(m.tokenizer, text)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, m: Model, config=None, simulate: bool = False, reserve: int = 0, attention: str = "auto"):
        """A compressed cache for ``config``, or transformers' own DynamicCache when it is None.
        ``attention``: how the compressed layers are read ("auto" over the codes, "reference" the
        decoded history through the library's own attention; ``tq_core.kvstore.LayerStore``)."""
        if config is None:
            return hf.dynamic_cache(m.model)
        peer = peer_method(config, simulate)
        if peer is not None:  # another project's cache, as transformers builds it (grows by itself)
            return peer.make_cache(self.lib, m.model, config)
        check_sliding(config, hf.sliding_layers(m.model), m.source or "this model")
        return hf.make_cache(m.model, config, simulate=simulate, reserve=reserve, attention=attention)

    def shape_cache(self, layers: int, config=None, reserve: int = 0):
        """A cache of ``layers`` layers with no model behind it (geometry-only measurements)."""
        if config is None:
            from transformers.cache_utils import DynamicCache

            return DynamicCache()
        check_shape_only(config)
        return hf.TurboQuantCache(config=config, reserve=reserve)

    def update(self, cache, layer: int, k, v):
        """Store (B, H, T, D) K/V in ``layer``; return what attention reads (dense)."""
        return cache.update(k, v, layer)

    def stores(self, cache) -> list:
        """The layer stores of the compressed layers, in layer order."""
        return [layer.store for layer in cache.compressed_layers()] if isinstance(cache, hf.TurboQuantCache) else []

    def layer_kv(self, cache) -> list:
        """(K, V) each uncompressed layer holds, (B, H, T, D); None for other layers."""
        return [(la.keys, la.values) if getattr(la, "keys", None) is not None and la.keys.numel() else None
                for la in cache.layers]

    def fork(self, m: Model, base_cache, config, upto: int | None = None, reserve: int = 0):
        """A compressed cache holding what one prefill through it would: the baseline's first
        ``upto`` (default all) tokens of every layer."""
        cache = self.new_cache(m, config, reserve=reserve)
        for i, kv in enumerate(self.layer_kv(base_cache)):
            if kv is None:
                raise ValueError(f"layer {i} of the baseline cache holds nothing to fork from")
            k, v = kv
            cache.update(k[:, :, :upto].clone(), v[:, :, :upto].clone(), i)
        return cache

    def held_bytes(self, cache) -> dict:
        """What a cache holds, by part, measured from its tensors (see ``harness.scoring.held_bytes``).
        A transformers ``QuantizedCache`` (a peer) is counted from its own tensors: ``codes``,
        ``scales``, ``zeros`` and the full-precision ``residual``; ``encoded``: the most tokens a
        layer holds quantized."""
        if hf.is_quantized_cache(cache):
            return quantized_held(hf.quantized_layers(cache), int(cache.get_seq_length()))
        parts, channels = {"uncompressed": 0}, 0
        for layer in cache.layers:
            store = getattr(layer, "store", None)
            if isinstance(layer, hf.TurboQuantLayer):
                if store is None:
                    continue
                for part, n in store.nbytes().items():
                    parts[part] = parts.get(part, 0) + n
                channels += store.kv_heads * (store.codec_k.dim + store.codec_v.dim)
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                parts["uncompressed"] += layer.keys.nbytes + layer.values.nbytes
                channels += layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1])
        return {"parts": parts, "tokens": int(cache.get_seq_length()), "channels": channels}

    # ---- running --------------------------------------------------------------------------------
    def forward(self, m: Model, ids, cache, last_only: bool = False):
        """Logits (T, vocab) of feeding ``ids`` (token ids) through ``cache`` (batch 1)."""
        x = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)], device=self.device)
        kw = {"logits_to_keep": 1} if last_only else {}
        with torch.no_grad():
            return m.model(input_ids=x, use_cache=True, **{hf.cache_kwarg(m.model): cache}, **kw).logits[0]

    def log_softmax(self, logits) -> np.ndarray:
        """float32 log-probs normalized in float64 (see ``harness.scoring``)."""
        return torch.log_softmax(logits.double(), dim=-1).float().cpu().numpy()

    def argmax(self, logits) -> int:
        return int(logits[-1].argmax())

    def holds_window_exactly(self, m: Model) -> bool:
        """Whether a compressed cache holds this model's sinks and window exactly as computed: they
        are held in 16 bits, so only a 16-bit model's are exact."""
        return next(m.model.parameters()).dtype in (torch.float16, torch.bfloat16)

    def greedy_held(self, prompt: int, new: int) -> int:
        """Tokens a cache holds after a greedy generation of ``new`` tokens: transformers' generate never feeds the last token it makes."""
        return prompt + new - 1

    def greedy(self, m: Model, ids: list[int], cache, max_new_tokens: int) -> list[int]:
        return hf.greedy(m.model, m.native, ids, cache, max_new_tokens)

    # ---- arrays and clocks ----------------------------------------------------------------------
    def from_numpy(self, x: np.ndarray, dtype=None):
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t if dtype is None else t.to(dtype)

    def to_numpy(self, x) -> np.ndarray:
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()

    def randn(self, shape, dtype=None):
        return torch.randn(*shape, device=self.device).to(dtype or self.float32)

    def empty(self, shape, dtype=None):
        return torch.empty(*shape, device=self.device, dtype=dtype or self.float32)

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    def gpu_time(self, fn, rounds: int = 20, warmup: int = 3) -> float | None:
        """Median seconds of device time per call of ``fn`` (no arguments; or a list of such calls, e.g.
        one per input copy larger than the L2 cache, timed per call), replayed as a CUDA graph and
        timed with CUDA events; None on CPU (there the call's wall time is what counts)."""
        if self.device != "cuda":
            return None
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        graph = self.graph(fns, warmup)
        graph.replay()
        seconds = self.replay_seconds(graph, rounds) / len(fns)
        del graph
        return seconds

    def graph(self, fn, warmup: int = 1):
        """A CUDA graph of ``fn`` (no arguments; or a list of such calls, captured in order), after
        ``warmup`` eager runs on a side stream (kernels compiled, constants cached). Capturing runs
        nothing: the state ``fn`` changes moves only when the graph is replayed."""
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for f in fns:
                    f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        return graph

    @staticmethod
    def replay_seconds(graph, rounds: int) -> float:
        """Median seconds of one replay of ``graph`` over ``rounds`` replays, timed with CUDA events."""
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    def cat(self, xs, axis: int):
        return torch.cat(xs, dim=axis)

    def sdpa_backends(self) -> tuple:
        """The attention backends the baseline can be timed with (``sdpa``'s ``backend``)."""
        return ("flash", "default") if self.device == "cuda" else ("default",)

    def sdpa(self, q, k, v, scale: float, backend: str = "flash"):
        """The uncompressed baseline's attention, q (B, Hq, Tq, D) over k, v (B, H, n, D).

        On CUDA ``backend="flash"`` (what a growing cache is timed with) runs torch's flash backend,
        falling back to memory-efficient, then math, for inputs flash does not take; ``"default"`` is
        torch's own choice. Measured on an H200 (torch 2.11): the default picks cuDNN for a GQA decode
        step, which is faster at a fixed length (1.32 vs 1.62 ms for 32 layers at 1 x 32k) but plans
        again for every new key length, 40-50 ms per step of a growing cache. On CPU: torch's own."""
        F = torch.nn.functional
        if self.device != "cuda" or backend == "default":
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        if backend != "flash":
            raise ValueError(f"backend must be one of {', '.join(self.sdpa_backends())}, got {backend!r}")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def sync(self, *arrays) -> None:
        """Wait for queued device work, so a clock read after it measures it."""
        if self.device == "cuda":
            torch.cuda.synchronize()

    def cache_state(self, cache) -> list:
        return []  # torch runs eagerly: nothing of a cache is left to evaluate

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else None

    def free(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def threads(self, n: int):
        """torch CPU intra-op threads inside the block, restored after (0: leave as is; no-op on CUDA).

        On a 2-core machine shared with other jobs, torch's default 2-thread pool spends most of its
        time in barriers (measured 5-20x slower than one thread under load), so suites pin 1 thread.
        """
        if n == 0 or self.device != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def thread_count(self) -> int | None:
        return torch.get_num_threads() if self.device == "cpu" else None

    def device_name(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name(0)
        return platform.processor() or platform.machine()

    def versions(self) -> dict:
        """Installed versions of the host library's distributions (recorded beside goldens)."""
        import importlib.metadata as md

        return {d: md.version(d) for d in ("torch", "transformers")}

    slow_cpu_backend = False  # torch runs the whole default tier on a CPU

    def gemm_gflops(self) -> None:
        """None: torch binds its own BLAS (only MLX's choice of BLAS is recorded)."""
        return None

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
