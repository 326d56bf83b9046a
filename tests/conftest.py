"""Shared fixtures of the unit tests: the real default model on both backends, and corpus tokens.

``hf_model`` / ``mlx_model`` load SmolLM2-135M-Instruct once per session, offline, from the
converted safetensors folder (``tq_core.models``); they skip when the model is unavailable.

torch runs with ``TQ_TEST_TORCH_THREADS`` intra-op threads (default 1) while the model is loaded:
the work per op is tiny (135M parameters, a few tokens), and on a small or shared CPU the
OpenMP/MKL thread hand-offs cost more than they gain (measured on a busy 2-core box: greedy
generation went from ~28 s to ~4 s for 20 tokens with one thread).
"""

from __future__ import annotations

import os
import pytest

from harness import hosts

CORPUS_TOKENS = 1100
MLX_HINT = "mlx-lm not installed: pip install 'tq-core[mlx-cpu]'"


def _require_default_model():
    from tq_core import models

    try:
        models.locate_gguf()
    except FileNotFoundError as exc:
        if not models._is_complete(models._default_target()):
            pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def hf_model():
    """(model, tokenizer) of the default model with transformers, fp32, CPU, eval mode."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tq_core import models

    _require_default_model()
    with hosts.get("torch-cpu").threads(int(os.environ.get("TQ_TEST_TORCH_THREADS", "1"))):
        yield models.load_hf()


@pytest.fixture(scope="session")
def mlx_model():
    """(model, tokenizer) of the default model with mlx-lm (same safetensors folder)."""
    pytest.importorskip("mlx.core", reason=MLX_HINT)
    pytest.importorskip("mlx_lm", reason=MLX_HINT)
    from tq_core import models

    _require_default_model()
    return models.load_mlx()


def corpus_text() -> str:
    """CPython's pydoc topics, the corpus shared by the tests and the harness."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="session")
def corpus_ids(hf_model) -> list[int]:
    """The first ``CORPUS_TOKENS`` (1100) token ids of the corpus, HF tokenizer, no special tokens."""
    _, tokenizer = hf_model
    text = corpus_text()[: CORPUS_TOKENS * 8]  # ~3.5 chars/token here: plenty, without tokenizing 700 kB
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:CORPUS_TOKENS]
    assert len(ids) == CORPUS_TOKENS
    return ids


@pytest.fixture(scope="session")
def make_tiny_llama():
    """``make(**shape) -> (torch CPU host, hosts.Model)``: a random 2-layer Llama (vocab 97), seeded.
    initializer_range 0.2 (not 0.02): peaked attention and logits, so quantization noise shows.
    ``enable_attention``: read compressed caches over their codes, as the torch host loads models."""

    def make(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=256, enable_attention=False):
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        from harness.identity import geometry
        from tq_core.integrations import hf

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden_size, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=num_attention_heads,
                                       num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                                       max_position_embeddings=max_position_embeddings, initializer_range=0.2)
        model = transformers.LlamaForCausalLM(cfg).eval()
        if enable_attention:
            hf.enable_attention(model)
        return hosts.get("torch-cpu"), hosts.Model(model, None, None, geometry(model.config))

    return make
