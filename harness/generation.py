"""Greedy generation through a chosen cache, the same way on every host.

``config=None`` means the host library's uncompressed cache (the baseline). The host runs the
library's own generation loop (transformers ``generate``, mlx-lm ``stream_generate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tq_core.config import CacheConfig
from tq_core.greedy import match, prompt_ids  # noqa: F401  (the harness's prompts are a user's prompts)


@dataclass
class Generation:
    """Result of one greedy generation: new token ids, their text, and bytes the cache held."""

    tokens: list[int]
    text: str
    cache_nbytes: int
    cache_parts: dict


def generate(host, m, ids: list[int], config: CacheConfig | None, max_new_tokens: int = 64) -> Generation:
    """Greedy-decode ``max_new_tokens`` after ``ids`` (stops early at end-of-sequence)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cache = host.new_cache(m, config, reserve=host.greedy_held(len(ids), max_new_tokens))
    new = host.greedy(m, ids, cache, max_new_tokens)
    parts = host.held_bytes(cache)["parts"]
    total = sum(parts.values())
    return Generation(new, m.tokenizer.decode(new, skip_special_tokens=True), total, {**parts, "total": total})
