"""Any local GGUF file as the model (``--tq-model x.gguf``, ``tq run --model x.gguf``): converted once
into the model cache like the default, with its tokenizer and RoPE settings; a bad one refused in one
line naming the option. No network: the GGUFs are written here with the ``gguf`` package.

The tiny model is a llama with random weights, a byte-level BPE tokenizer of 256 + 3 tokens, a RoPE
base of 50 000 and linear RoPE scaling x2 (which transformers' GGUF loader does not carry over by
itself: ``tq_core.models._carry_rope`` does).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from harness import identity as I
from tq_core import models as M

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test's GGUF files (pip install gguf)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
ROPE_BASE, ROPE_FACTOR = 50_000.0, 2.0
EXTRA_TOKENS = ["Ġt", "he", "<|endoftext|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: pathlib.Path, arch: str = "llama", rope_freqs: bool = False) -> pathlib.Path:
    """A tiny ``arch`` GGUF with random float32 weights and a byte-level tokenizer, at ``path``."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = _byte_alphabet() + EXTRA_TOKENS
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(ROPE_FACTOR)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])  # the last one is a control token
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(True)  # as Gemma's and Llama's tokenizers do

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(HIDDEN, HEADS * HEAD_DIM))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output.weight", t(vocab, HIDDEN))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tq-cache")


@pytest.fixture
def in_cache(cache, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("TQ_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def converted(tiny, in_cache) -> pathlib.Path:
    return M.ensure_local(tiny)


# ------------------------------------------------------------------ conversion


def test_header_reader_reads_what_transformers_needs(tiny):
    meta = M.gguf_metadata(tiny)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.rope.freq_base"] == pytest.approx(ROPE_BASE)
    assert meta["llama.rope.scaling.type"] == "linear"
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped, not parsed
    assert M._read_gguf_header(tiny)[1][0] == "token_embd.weight"


def test_gguf_converts_once_into_the_cache(tiny, converted, in_cache):
    sha = M._file_sha256(tiny)
    assert converted == in_cache / "models" / f"tiny-llama-{sha[:12]}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tq_source.json"):
        assert (converted / name).is_file(), name
    assert not list(converted.parent.glob(".tiny-llama-*.tmp-*"))
    source = json.loads((converted / "tq_source.json").read_text())
    assert (source["gguf_sha256"], source["gguf_size"], source["architecture"]) == (sha, tiny.stat().st_size, "llama")
    assert source["gguf_path"] == str(tiny.resolve())
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    t = time.perf_counter()
    assert M.ensure_local(str(tiny)) == converted
    assert time.perf_counter() - t < 0.5  # found by path, size and mtime: not even hashed
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_a_copy_of_the_same_file_reuses_the_conversion(tiny, converted, tmp_path):
    copy = tmp_path / "elsewhere" / tiny.name
    copy.parent.mkdir()
    shutil.copy(tiny, copy)
    assert M.ensure_local(copy) == converted  # named by content


def test_rope_and_geometry_carried_over(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["rope_theta"] == pytest.approx(ROPE_BASE)  # top level: what mlx-lm reads
    assert cfg["rope_scaling"]["factor"] == pytest.approx(ROPE_FACTOR)  # for mlx-lm too
    assert "quantization_config" not in cfg
    geo = M.geometry(cfg)
    assert (geo.layers, geo.heads, geo.kv_heads, geo.head_dim) == (LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    from transformers import AutoConfig

    rope = AutoConfig.from_pretrained(str(converted)).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("linear", ROPE_FACTOR, ROPE_BASE)


def test_loads_with_its_tokenizer(tiny, converted):
    import torch

    model, tok = M.load_hf(str(tiny))
    ids = tok("the the")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "the the"
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["Ġt", "he"]  # the GGUF's merges
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 256 + len(EXTRA_TOKENS)) and torch.isfinite(logits).all()


def test_documents_are_read_with_the_tokenizers_bos(tiny, converted):
    """The harness scores text as the model reads a document: with the BOS its tokenizer puts first
    (Gemma-3 270M without it: baseline perplexity 85 instead of 22), and nothing added by a tokenizer
    that puts none first (SmolLM2's)."""
    from transformers import AutoTokenizer

    from tq_core.greedy import text_ids

    tok = AutoTokenizer.from_pretrained(str(converted))
    plain = tok("the the", add_special_tokens=False)["input_ids"]
    assert text_ids(tok, "the the") == [tok.bos_token_id, *plain]

    class NoBos:  # a tokenizer that adds no special token (SmolLM2's)
        all_special_ids = [0]

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    assert text_ids(NoBos(), "ab") == [97, 98]


def test_mlx_reads_the_same_rope(tiny, converted):
    """mlx-lm reads the top-level rope keys: if the scaling were lost, its logits would differ."""
    mx = pytest.importorskip("mlx.core", reason="mlx not installed: the mlx-lm load is not tested")
    import numpy as np
    import torch

    model, tok = M.load_hf(tiny)
    ids = tok("the the the " * 20)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    mlx_model, _ = M.load_mlx(tiny)
    out = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_model_id_drops_the_suffix(tiny):
    assert I.model_id(str(tiny)) == "tiny-llama"
    assert I.model_id("/data/Gemma-3-270M-Q4_K_M.GGUF") == "Gemma-3-270M-Q4_K_M"


# ------------------------------------------------------------------ refused, in one line


def _one_line_naming(exc_info, option: str, *words: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.startswith(f"{option} "), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.parametrize("option", ["--model", "--tq-model"])
def test_missing_gguf_path(tmp_path, option):
    with pytest.raises(ValueError) as info:
        M.check(str(tmp_path / "nope.gguf"), option)
    _one_line_naming(info, option, "GGUF file not found", "nope.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        M.ensure_local(str(tmp_path / "nope.gguf"))


def test_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError) as info:
        M.check(str(bad), "--tq-model")
    _one_line_naming(info, "--tq-model", "neither a model folder nor a GGUF file")
    with pytest.raises(ValueError, match="neither a model folder nor a GGUF file"):
        M.ensure_local(bad)


def test_a_truncated_gguf(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:40])
    with pytest.raises(ValueError) as info:
        M.check(str(cut), "--model")
    _one_line_naming(info, "--model", "cut short")


def test_an_architecture_transformers_cannot_load(tmp_path, in_cache):
    path = tmp_path / "exotic.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as info:
        M.check(str(path), "--tq-model")
    _one_line_naming(info, "--tq-model", "architecture 'rwkv7'", "cannot load", "gemma3")
    with pytest.raises(ValueError, match="architecture 'rwkv7'"):
        M.ensure_local(path)
    assert not list((in_cache / "models").glob("exotic-*"))  # nothing converted, nothing left


def test_rope_that_cannot_be_carried_is_refused(tmp_path, in_cache):
    """Per-frequency RoPE factors (Llama-3.1 GGUFs) are dropped by transformers: refused, not
    converted into a model that computes something else."""
    path = write_tiny_gguf(tmp_path / "llama31-like.gguf", rope_freqs=True)
    with pytest.raises(ValueError) as info:
        M.ensure_local(path)
    assert "rope_freqs" in str(info.value) and "\n" not in str(info.value)
    assert not [p for p in (in_cache / "models").glob("llama31-like-*") if not p.name.endswith(".lock")]


def test_carry_rope_rules():
    """Per-layer-type rope parameters (Gemma 3): scaling goes to the global layers, the sliding
    layers' base and pattern are written where mlx-lm reads them."""
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 2
    cfg = {"rope_theta": 1e6, "layer_types": types, "rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    meta = {"general.architecture": "gemma3", "gemma3.rope.scaling.type": "linear",
            "gemma3.rope.scaling.factor": 8.0, "gemma3.rope.freq_base_swa": 2e4}
    M._carry_rope(cfg, meta, [], pathlib.Path("g.gguf"))
    assert cfg["rope_parameters"]["full_attention"] == {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0}
    assert cfg["rope_parameters"]["sliding_attention"] == {"rope_theta": 2e4, "rope_type": "default"}
    assert (cfg["rope_local_base_freq"], cfg["sliding_window_pattern"], cfg["rope_theta"]) == (2e4, 6, 1e6)
    with pytest.raises(ValueError, match="'longrope'"):
        M._carry_rope({"rope_parameters": {"rope_theta": 1e4}},
                      {"general.architecture": "phi3", "phi3.rope.scaling.type": "longrope",
                       "phi3.rope.scaling.factor": 4.0}, [], pathlib.Path("p.gguf"))


# ------------------------------------------------------------------ through the options


def test_tq_model_option_refuses_a_bad_gguf_before_the_session(tmp_path):
    """``pytest suites --tq-model <bad.gguf>``: one usage error naming the option, no test run."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites/test_mse.py", "-q", "-p", "no:cacheprovider",
                           "--tq-target", "torch-cpu", "--tq-no-results", "--tq-model", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: --tq-model {bad}: ") and "cut short" in errors[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr


def _tq(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "tq_core.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_refuses_a_non_gguf_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = _tq("run", "--model", str(bad))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tq: error: --model {bad}: neither a model folder nor a GGUF"), \
        r.stderr


@pytest.mark.model
def test_cli_runs_a_gguf(tiny, cache):
    """``tq compare --model x.gguf``: converted (or found in the cache) and run through the cache."""
    r = _tq("compare", "--model", str(tiny), "--prompt", "the the", "--max-new-tokens", "4", "--config",
            "K4V2+s0w0", env={"TQ_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--- baseline (torch" in r.stdout and "--- K4V2+s0w0 (torch" in r.stdout and "token match rate" in r.stdout
