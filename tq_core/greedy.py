"""Greedy generation's two ends: a prompt as token ids the way a user sends it (and a document's
ids as the model reads one), and the comparison of two generated sequences (the CLI's
``tq compare`` and the harness's generation suite)."""

from __future__ import annotations


def hf_tokenizer(tokenizer):
    """The transformers tokenizer itself: mlx-lm wraps it in a ``TokenizerWrapper`` (a transformers
    fast tokenizer's own ``_tokenizer`` is the raw ``tokenizers.Tokenizer``, so that name alone does
    not tell them apart)."""
    return tokenizer._tokenizer if type(tokenizer).__name__ == "TokenizerWrapper" else tokenizer


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> tuple[list[int], str]:
    """(token ids of ``prompt``, the format used): one user turn of the tokenizer's chat template with
    the generation prompt appended, when the tokenizer has a template ("chat"); else the plain text
    with the tokenizer's own special tokens ("plain", e.g. base models). mlx-lm's wrapper is unwrapped."""
    tokenizer = hf_tokenizer(tokenizer)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), "chat"
    return list(tokenizer(prompt)["input_ids"]), "plain"


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a document as the model reads one: the tokenizer's own leading special tokens
    (the BOS that Gemma's and Llama's tokenizers put first; none for SmolLM2's), then the text, with
    no special token after it. Without its BOS a Gemma model reads text out of distribution (Gemma-3
    270M's baseline perplexity on the default corpus measured 85 without it, 22 with it)."""
    tokenizer = hf_tokenizer(tokenizer)
    special = set(tokenizer.all_special_ids)
    lead = []
    for t in tokenizer("a")["input_ids"]:  # what the tokenizer adds before any text
        if t not in special:
            break
        lead.append(t)
    return lead + list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
