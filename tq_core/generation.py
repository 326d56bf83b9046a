"""Greedy generation through a chosen cache, the same way for transformers and mlx-lm.

Used by the CLI (``tq run`` / ``tq compare``) and the generation suite. ``config=None`` means the
host library's uncompressed cache (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CacheConfig

BACKENDS = ("torch", "mlx")


@dataclass
class Generation:
    """Result of one greedy generation: new token ids, their text, and bytes the cache held."""

    tokens: list[int]
    text: str
    cache_nbytes: int
    cache_parts: dict


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``, wrapped in the tokenizer's chat template when it has one."""
    tok = hf_tokenizer(tokenizer)
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(prompt)["input_ids"])


def hf_tokenizer(tokenizer):
    """The transformers tokenizer itself (mlx-lm wraps it in a ``TokenizerWrapper``)."""
    if type(tokenizer).__name__ == "TokenizerWrapper":
        return tokenizer._tokenizer
    return tokenizer


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers or mlx-lm model, from its config."""
    cfg = getattr(model, "config", None) or getattr(model, "args")
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def generate(model, tokenizer, ids: list[int], config: CacheConfig | None, backend: str,
             max_new_tokens: int = 64) -> Generation:
    """Greedy-decode ``max_new_tokens`` after ``ids`` (stops early at end-of-sequence)."""
    check_backend(backend)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if backend == "torch":
        return _generate_torch(model, tokenizer, ids, config, max_new_tokens)
    return _generate_mlx(model, tokenizer, ids, config, max_new_tokens)


def _generate_torch(model, tokenizer, ids, config, max_new_tokens):
    import torch

    from .integrations import hf

    cache = hf.dynamic_cache(model) if config is None else hf.make_cache(model, config)
    device = next(model.parameters()).device
    inp = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             **{hf.cache_kwarg(model): cache})
    new = out[0, len(ids):].tolist()
    parts = cache.nbytes() if config is not None else {"total": hf.cache_nbytes(cache)}
    return Generation(new, tokenizer.decode(new, skip_special_tokens=True), hf.cache_nbytes(cache), parts)


def _generate_mlx(model, tokenizer, ids, config, max_new_tokens):
    import mlx.core as mx
    from mlx_lm import stream_generate

    from .integrations import mlx_lm

    cache = mlx_lm.baseline_cache(model) if config is None else mlx_lm.make_cache(model, config)
    new = []
    for resp in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_new_tokens,
                                prompt_cache=cache):
        new.append(int(resp.token))
        if resp.finish_reason is not None:
            break
    parts = {"total": mlx_lm.cache_nbytes(cache)}
    if config is not None:
        parts = {k: sum(c.nbytes_parts()[k] for c in cache) for k in ("codes", "norms", "sinks", "window", "other")}
        parts["total"] = sum(parts.values())
    text = hf_tokenizer(tokenizer).decode(new, skip_special_tokens=True)
    return Generation(new, text, mlx_lm.cache_nbytes(cache), parts)


def match(a: list[int], b: list[int]) -> tuple[float, int | None]:
    """(token match rate over the longer sequence, index of the first divergence or None)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0, None
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    return same / n, first
