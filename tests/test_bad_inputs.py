"""Bad-input catalogue: every hostile or mistaken input a user can hand tq_core meets one clear error
that names the parameter and says what is allowed — never a traceback from deep inside, a silent
wrong answer or a silent success.

Sections: the codec (``TurboQuantizer``, packing, rotations), ``CacheConfig`` and labels, methods,
the layer store and the caches (transformers, mlx-lm), ``patch``, the ``tq`` command line (one
line ``tq: error: ...``, exit 2, no traceback, nothing loaded first) and the harness's pytest
options (one ``ERROR: ...`` usage line, exit 4). Each case is one row: what is called, the error
type, and a pattern naming the parameter and what it accepts.

The CLI and pytest runs are subprocesses, started together (two at a time) when the first of them
is needed, so the catalogue costs seconds, not minutes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tq_core
from tq_core import CacheConfig, TurboQuantizer, methods, packing, rotation
from tq_core.kvstore import LayerStore

torch = pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _have(mod: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


HAVE_MLX = _have("mlx") and _have("mlx.core") and _have("mlx_lm")
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx/mlx-lm not installed: pip install 'tq-core[mlx-cpu]'")


def case(id_: str, call, exc, match: str, *marks):
    return pytest.param(call, exc, match, id=id_, marks=list(marks))


def check(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip(), f"the error spans several lines: {message!r}"
    assert len(message) < 400, f"the error is not short: {message!r}"


# ==== the codec ======================================================================================
Q = TurboQuantizer(64, 4)
X = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
ENC = Q.encode(X)


def _decode(**changes):
    return lambda: Q.decode(dataclasses.replace(ENC, **changes))


CODEC = [
    case("dim-1", lambda: TurboQuantizer(1, 4), ValueError, r"dim must be an int >= 2, got 1"),
    case("dim-float", lambda: TurboQuantizer(64.0, 4), TypeError, r"dim must be an int >= 2, got float"),
    case("dim-bool", lambda: TurboQuantizer(True, 4), TypeError, r"dim must be an int >= 2, got bool"),
    case("bits-0", lambda: TurboQuantizer(64, 0), ValueError, r"bits must be an int in 1..8, got 0"),
    case("bits-9", lambda: TurboQuantizer(64, 9), ValueError, r"bits must be an int in 1..8, got 9"),
    case("bits-str", lambda: TurboQuantizer(64, "4"), TypeError, r"bits must be an int in 1..8, got str"),
    case("seed-negative", lambda: TurboQuantizer(64, 4, seed=-1), ValueError, r"seed must be an int >= 0, got -1"),
    case("seed-float", lambda: TurboQuantizer(64, 4, seed=1.5), TypeError, r"seed must be an int >= 0, got float"),
    case("precision", lambda: TurboQuantizer(64, 4, precision="float16"), ValueError,
         r"precision must be one of \('float32', 'float64'\), got 'float16'"),
    case("x-list", lambda: Q.encode(X.tolist()), TypeError,
         r"x must be a torch.Tensor, an mlx.core.array or a numpy.ndarray, got list"),
    case("x-int", lambda: Q.encode(X.astype(np.int32)), TypeError,
         r"x must have a floating dtype \(float32, float16, float64\), got int32"),
    case("x-complex", lambda: Q.encode(X.astype(np.complex64)), TypeError, r"x must have a floating dtype"),
    case("x-torch-bool", lambda: Q.encode(torch.zeros(2, 64, dtype=torch.bool)), TypeError,
         r"x must have a floating dtype \(float32, float16, bfloat16, float64\), got torch.bool"),
    case("x-last-dim", lambda: Q.encode(X[:, :32]), ValueError, r"x.shape\[-1\] must equal dim=64, got shape \(3, 32\)"),
    case("x-scalar", lambda: Q.encode(np.float32(1.0)), ValueError, r"x.shape\[-1\] must equal dim=64, got shape \(\)"),
    case("x-empty", lambda: Q.encode(X[:0]), ValueError, r"x must hold at least one vector, got shape \(0, 64\)"),
    case("x-nan", lambda: Q.encode(np.where(np.arange(64) == 3, np.nan, X).astype(np.float32)), ValueError,
         r"x must be finite: it contains NaN or Inf"),
    case("x-huge", lambda: Q.encode(X * np.float32(1e5)), ValueError,
         r"x has a vector norm beyond the fp16 norm storage \(>= 65504"),
    case("x-tiny", lambda: Q.encode(X * np.float32(1e-9)), ValueError,
         r"x has a nonzero vector norm below the fp16 norm storage's normal range \(< 6.1e-05\)"),
    case("x-subnormal-torch", lambda: Q.encode(torch.full((1, 64), 1e-41)), ValueError,
         r"below the fp16 norm storage's normal range"),
    case("decode-not-encoded", lambda: Q.decode(ENC.codes), TypeError,
         r"enc must be an Encoded from TurboQuantizer.encode, got ndarray"),
    case("decode-other-quantizer", lambda: TurboQuantizer(64, 3).decode(ENC), ValueError,
         r"enc was encoded with dim=64, bits=4, seed=0, norm_correction=True; this quantizer has dim=64, bits=3"),
    case("decode-codes-cut", _decode(codes=ENC.codes[:, :7]), ValueError,
         r"codes.shape\[-1\] must be 32 \(dim=64 codes of 4 bits, packed\), got shape \(3, 7\)"),
    case("decode-codes-int64", _decode(codes=ENC.codes.astype(np.int64)), TypeError,
         r"codes must be uint8 \(packed 4-bit codes\), got int64"),
    case("decode-norms-float32", _decode(norms=ENC.norms.astype(np.float32)), TypeError,
         r"norms must be float16, got float32"),
    case("decode-norms-shape", _decode(norms=ENC.norms[:1]), ValueError,
         r"codes.shape\[:-1\] must equal norms.shape, got \(3, 32\) and \(1,\)"),
    case("decode-mixed-backends", _decode(norms=torch.from_numpy(ENC.norms)), TypeError,
         r"codes and norms must be arrays of one backend, got ndarray and Tensor"),
    case("decode-dtype", lambda: Q.decode(ENC, dtype=np.int8), TypeError,
         r"dtype must be a floating dtype of numpy \(float32, float16, float64\)"),
    case("pack-bits", lambda: packing.pack(np.zeros((2, 8), np.uint8), 9), ValueError,
         r"bits must be an int in 1..8, got 9"),
    case("packed-size-bits", lambda: packing.packed_size(64, 0), ValueError, r"bits must be an int in 1..8, got 0"),
    case("derive-seed-kind", lambda: rotation.derive_seed(0, 0, "q"), ValueError, r"kind must be 'k' or 'v', got 'q'"),
    case("derive-seed-layer", lambda: rotation.derive_seed(0, -1, "k"), ValueError, r"layer must be an int >= 0, got -1"),
    case("haar-dim", lambda: rotation.haar(1, 0), ValueError, r"dim must be an int >= 2, got 1"),
]


@pytest.mark.parametrize("call, exc, match", CODEC)
def test_codec(call, exc, match):
    check(call, exc, match)


# ==== CacheConfig, labels, methods ===================================================================
CONFIG = [
    case("bits_k-0", lambda: CacheConfig(bits_k=0), ValueError, r"bits_k must be an int in 1..8, got 0"),
    case("bits_v-9", lambda: CacheConfig(bits_v=9), ValueError, r"bits_v must be an int in 1..8, got 9"),
    case("sinks-negative", lambda: CacheConfig(sinks=-1), ValueError, r"sinks must be a non-negative int, got -1"),
    case("window-float", lambda: CacheConfig(window=1.5), TypeError, r"window must be a non-negative int, got float 1.5"),
    case("seed-negative", lambda: CacheConfig(seed=-2), ValueError, r"seed must be a non-negative int, got -2"),
    case("norm_correction-str", lambda: CacheConfig(norm_correction="yes"), TypeError,
         r"norm_correction must be a bool, got 'yes'"),
    case("method-unknown", lambda: CacheConfig(method="nope"), ValueError,
         r"method must be one of turboquant, uniform, quanto, hqq, mlxkv, llamacpp, got 'nope'"),
    case("group_size-on-turboquant", lambda: CacheConfig(group_size=32), ValueError,
         r"group_size is not an option of method 'turboquant' \(its options: norm_correction, center\)"),
    case("norm_correction-on-uniform", lambda: CacheConfig(method="uniform", norm_correction=False), ValueError,
         r"norm_correction is not an option of method 'uniform' \(its options: group_size\)"),
    case("replace-unknown-field", lambda: CacheConfig().replace(bits=3), TypeError,
         r"CacheConfig has no field 'bits' \(fields: bits_k, bits_v"),
    case("label-empty", lambda: CacheConfig.parse(""), ValueError,
         r"config label '' is not of the form \[method:\]K<bits>V<bits>"),
    case("label-no-v", lambda: CacheConfig.parse("K4"), ValueError, r"config label 'K4' is not of the form"),
    case("label-sinks-no-window", lambda: CacheConfig.parse("K4V2+s4"), ValueError, r"is not of the form"),
    case("label-bits", lambda: CacheConfig.parse("K9V2"), ValueError,
         r"config label 'K9V2': bits_k must be an int in 1..8, got 9"),
    case("label-method", lambda: CacheConfig.parse("foo:K4V2"), ValueError,
         r"config label 'foo:K4V2': unknown method 'foo' \(known: turboquant, uniform, quanto, hqq, mlxkv, llamacpp\)"),
    case("label-option", lambda: CacheConfig.parse("K4V2+nc=2"), ValueError,
         r"unknown option nc='2' for method 'turboquant' \(allowed: nc=0, nc=1, c=0, c=1, seed=<int>\)"),
    case("label-seed", lambda: CacheConfig.parse("K4V2+seed=x"), ValueError,
         r"unknown option seed='x' for method 'turboquant' \(allowed: .*seed=<int>\)"),
    case("label-option-twice", lambda: CacheConfig.parse("K4V2+nc=0+nc=0"), ValueError, r"option 'nc' given twice"),
    case("label-uniform-group", lambda: CacheConfig.parse("uniform:K4V2+g=x"), ValueError,
         r"unknown option g='x' for method 'uniform' \(allowed: g=<group size>, seed=<int>\)"),
    case("label-not-str", lambda: CacheConfig.parse(42), TypeError, r"config label must be a str, got int"),
    case("methods-get", lambda: methods.get("kivi"), ValueError, r"method must be one of turboquant, uniform, quanto, hqq, mlxkv, llamacpp, got 'kivi'"),
]


@pytest.mark.parametrize("call, exc, match", CONFIG)
def test_config(call, exc, match):
    check(call, exc, match)


# ==== the layer store and the caches =================================================================
def _kv(b=1, h=2, t=3, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def _filled_store():
    s = LayerStore(CacheConfig(sinks=1, window=1), 0, 64)
    s.update(*_kv())
    return s


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_cache(**kw):
    from tq_core.integrations import hf

    return hf.TurboQuantCache(_tiny_llama().config, **kw)


def _hf_filled_cache():
    from tq_core.integrations import hf

    c = hf.TurboQuantCache(None, config=CacheConfig(sinks=1, window=1))
    c.update(*_kv(d=32), 0)
    return c


def _left_padding_3d():
    from tq_core.integrations import hf

    return hf.left_padding(torch.ones(1, 1, 4))


CACHES = [
    case("store-attention", lambda: LayerStore(CacheConfig(), 0, 64, attention="fast"), ValueError,
         r"attention must be one of auto, ops, reference, got 'fast'"),
    case("store-lead", lambda: LayerStore(CacheConfig(), 0, 64, lead=-1), ValueError,
         r"lead must be a non-negative int, got -1"),
    case("store-group-size", lambda: LayerStore(CacheConfig.parse("uniform:K4V2+g=5"), 0, 64), ValueError,
         r"group_size must divide head_dim 64, got 5"),
    case("store-head-dim", lambda: LayerStore(CacheConfig(), 0, 64).update(*_kv(d=32)), ValueError,
         r"k must be \(batch, kv_heads, tokens, 64\) for this layer, got \(1, 2, 3, 32\)"),
    case("store-3d", lambda: LayerStore(CacheConfig(), 0, 64).update(torch.zeros(2, 3, 64), torch.zeros(2, 3, 64)),
         ValueError, r"k must be \(batch, kv_heads, tokens, 64\) for this layer, got \(2, 3, 64\)"),
    case("store-k-v-tokens", lambda: LayerStore(CacheConfig(), 0, 64).update(_kv(t=3)[0], _kv(t=4)[1]), ValueError,
         r"k and v must hold the same tokens: \(batch, kv_heads, tokens\) \(1, 2, 3\) vs \(1, 2, 4\)"),
    case("store-batch-changed", lambda: _filled_store().update(*_kv(b=2)), ValueError,
         r"k must have the \(batch, kv_heads\) \(1, 2\) of the tokens held, got \(2, 2\)"),
    case("hf-cache-config-and-fields", lambda: _hf_cache(config=CacheConfig(), bits_k=3), TypeError,
         r"give either config= or CacheConfig fields, not both"),
    case("hf-cache-config-label", lambda: _hf_cache(config="K4V2"), TypeError,
         r"config must be a CacheConfig \(CacheConfig.parse\(label\) makes one from a label\), got str"),
    case("hf-cache-attention", lambda: _hf_cache(attention="fast"), ValueError,
         r"attention must be one of auto, ops, reference, got 'fast'"),
    case("hf-cache-reserve", lambda: _hf_cache(reserve=-1), ValueError, r"reserve must be a non-negative int, got -1"),
    case("hf-cache-left-padding", lambda: _hf_cache(left_padding=-3), ValueError,
         r"left_padding must be a non-negative int, got -3"),
    case("hf-cache-field", lambda: _hf_cache(bits=3), TypeError, r"unexpected keyword argument 'bits'"),
    case("hf-cache-left-padding-late", lambda: _hf_filled_cache().set_left_padding(2), ValueError,
         r"left_padding can only be set on an empty cache"),
    case("hf-cache-crop", lambda: _hf_filled_cache().crop(1), NotImplementedError,
         r"TurboQuantCache cannot crop: history is held encoded \(assisted decoding is not supported\)"),
    case("hf-left-padding-mask", _left_padding_3d, ValueError,
         r"attention_mask must be a \(batch, tokens\) tensor, got torch.Size\(\[1, 1, 4\]\)"),
]


@pytest.mark.parametrize("call, exc, match", CACHES)
def test_caches(call, exc, match):
    check(call, exc, match)


def _mlx_tiny():
    import mlx_lm.models.llama as llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=97, num_key_value_heads=2,
                           head_dim=32)
    return llama.Model(args)


def _mlx_cache_state():
    from tq_core.integrations import mlx_lm as tqm

    tqm.TurboQuantMLXCache(CacheConfig(), 0).state = []


def _mlx_merge():
    from tq_core.integrations import mlx_lm as tqm

    tqm.TurboQuantMLXCache.merge([tqm.TurboQuantMLXCache(CacheConfig(), 0)])


MLX = [
    case("mlx-cache-state", _mlx_cache_state, NotImplementedError,
         r"a TurboQuantMLXCache cannot be restored from a saved state", needs_mlx),
    case("mlx-cache-merge", _mlx_merge, NotImplementedError,
         r"TurboQuantMLXCache cannot be merged into a batch \(mlx-lm batch_generate", needs_mlx),
    case("mlx-patch-layer", lambda: tq_core.patch(_mlx_tiny().layers[0]), TypeError,
         r"model must be an mlx-lm model \(as mlx_lm.load returns it: with model_type and layers\), "
         r"got mlx_lm.models.llama.TransformerBlock", needs_mlx),
    case("mlx-patch-inner-model", lambda: tq_core.patch(_mlx_tiny().model), TypeError,
         r"model must be an mlx-lm model .* got mlx_lm.models.llama.LlamaModel", needs_mlx),
    case("mlx-patch-group-size", lambda: tq_core.patch(_mlx_tiny(), config="uniform:K4V2+g=5"), ValueError,
         r"group_size must divide head_dim 32, got 5", needs_mlx),
]


@pytest.mark.parametrize("call, exc, match", MLX)
def test_mlx(call, exc, match):
    check(call, exc, match)


# ==== patch ===========================================================================================
def _tokenizer():
    from tq_core import models

    try:
        path = models.ensure_local()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _mlx_tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(_tokenizer())


PATCH = [
    case("not-a-model", lambda: tq_core.patch(object()), TypeError,
         r"model must be a transformers PreTrainedModel or an mlx-lm model, got builtins.object"),
    case("hf-tokenizer", lambda: tq_core.patch(_tokenizer()), TypeError,
         r"model must be a transformers PreTrainedModel or an mlx-lm model, got transformers\..*Tokenizer"),
    case("mlx-tokenizer", lambda: tq_core.patch(_mlx_tokenizer()), TypeError,
         r"model must be a transformers PreTrainedModel or an mlx-lm model, got mlx_lm.tokenizer_utils.TokenizerWrapper",
         needs_mlx),
    case("hf-layer", lambda: tq_core.patch(_tiny_llama().model.layers[0]), TypeError,
         r"model must be a transformers PreTrainedModel or an mlx-lm model, got .*LlamaDecoderLayer"),
    case("hf-base-model", lambda: tq_core.patch(_tiny_llama().model), TypeError,
         r"model must be a transformers model that can generate \(a ...ForCausalLM with generate\(\)\), got LlamaModel"),
    case("config-type", lambda: tq_core.patch(_tiny_llama(), config=42), TypeError,
         r"config must be a CacheConfig or its label, got int"),
    case("config-label", lambda: tq_core.patch(_tiny_llama(), config="K4V9"), ValueError,
         r"config label 'K4V9': bits_v must be an int in 1..8, got 9"),
    case("config-and-fields", lambda: tq_core.patch(_tiny_llama(), config="K4V2", window=8), TypeError,
         r"give either config= or the CacheConfig fields, not both"),
    case("unknown-field", lambda: tq_core.patch(_tiny_llama(), windows=8), TypeError,
         r"patch\(\) got 'windows', which is not a CacheConfig field \(fields: bits_k, bits_v, sinks, window"),
    case("bits", lambda: tq_core.patch(_tiny_llama(), bits_k=0), ValueError, r"bits_k must be an int in 1..8, got 0"),
    case("group-size-vs-head-dim", lambda: tq_core.patch(_tiny_llama(), config="uniform:K4V2+g=5"), ValueError,
         r"group_size must divide head_dim 32, got 5"),
]


@pytest.mark.parametrize("call, exc, match", PATCH)
def test_patch(call, exc, match):
    check(call, exc, match)


def test_refused_patch_changes_nothing():
    """A patch refused at ``patch()`` time leaves the model as it was (and a patched one patched)."""
    from tq_core.integrations.patch import patched_config

    model = _tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(ValueError):
        tq_core.patch(model, config="uniform:K4V2+g=5")
    assert patched_config(model) is None and "generate" not in vars(model)
    assert model.config._attn_implementation == before
    tq_core.patch(model, config="K3V3+s0w0")
    with pytest.raises(ValueError):
        tq_core.patch(model, config="uniform:K4V2+g=5")
    assert patched_config(model).label == "K3V3+s0w0"
    tq_core.unpatch(model)


# ==== subprocesses: the tq command line and pytest options ===========================================
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(extra)
    return env


CLI = {  # id -> (argv, env, words of the one error line)
    "bits-k": (["run", "--bits-k", "9"], {}, ["bits_k must be an int in 1..8, got 9"]),
    "bits-k-word": (["run", "--bits-k", "four"], {}, ["argument --bits-k: invalid int value: 'four'"]),
    "bits-v": (["compare", "--bits-v", "0"], {}, ["bits_v must be an int in 1..8, got 0"]),
    "sinks": (["run", "--sinks", "-1"], {}, ["sinks must be a non-negative int, got -1"]),
    "window": (["run", "--window", "-5"], {}, ["window must be a non-negative int, got -5"]),
    "seed": (["run", "--seed", "-1"], {}, ["seed must be a non-negative int, got -1"]),
    "config-label": (["run", "--config", "K4V9"], {}, ["config label 'K4V9': bits_v must be an int in 1..8, got 9"]),
    "config-empty": (["run", "--config", ""], {}, ["config label '' is not of the form"]),
    "config-and-bits": (["run", "--config", "K4V2", "--bits-k", "3"], {},
                        ["give either --config or --bits-k, not both"]),
    "backend": (["run", "--backend", "jax"], {}, ["backend must be one of ('torch', 'mlx'), got 'jax'"]),
    "device": (["run", "--device", "foo"], {}, ["--device must be cpu, cuda, cuda:<index> or mps, got 'foo'"]),
    "device-mlx": (["run", "--backend", "mlx", "--device", "cpu"], {}, ["--device applies to --backend torch only"]),
    "max-new-tokens": (["run", "--max-new-tokens", "0"], {}, ["argument --max-new-tokens: must be an int >= 1, got 0"]),
    "model-path": (["run", "--model", "/nonexistent/path"], {}, ["model directory not found: /nonexistent/path"]),
    "model-hub": (["compare", "--model", "org/not-a-model"], {"HF_HUB_OFFLINE": "1"},
                  ["model 'org/not-a-model' is not a local folder", "Hugging Face hub id"]),
    "cache-dir": (["run"], {"TQ_CACHE_DIR": "/etc/passwd"}, ["TQ_CACHE_DIR=/etc/passwd is not a folder"]),
    "report-kld": (["report", "--kld-regress", "-1"], {}, ["--kld-regress must be a fraction > 0, got -1.0"]),
    "report-out-file": (["report", "--out", "{file}"], {}, ["--out {file} is a file: give a folder"]),
    "command": (["nosuch"], {}, ["argument command: invalid choice: 'nosuch'", "info", "report"]),
}
if not HAVE_MLX:
    CLI.pop("device-mlx")

PYTEST = {  # id -> (options, words of the one usage-error line)
    "target-empty": (["--tq-target="], ["--tq-target must name at least one of torch-cpu, torch-cuda, mlx"]),
    "target-twice": (["--tq-target=torch-cpu,torch-cpu"], ["--tq-target names 'torch-cpu' twice: each backend runs once"]),
    "target-unknown": (["--tq-target=tpu"], ["--tq-target entries must be in ('torch-cpu', 'torch-cuda', 'mlx', 'llama-cpp')",
                                             "'tpu'"]),
    "config-bits": (["--tq-config=K4V9"], ["config label 'K4V9': bits_v must be an int in 1..8, got 9"]),
    "config-form": (["--tq-config=nope"], ["config label 'nope' is not of the form"]),
    "method": (["--tq-method=nope"], ["unknown method 'nope' (known: turboquant, uniform, quanto, hqq, mlxkv, llamacpp)"]),
    "method-option": (["--tq-method=uniform+g=x"], ["unknown option g='x' for method 'uniform'"]),
    "tier": (["--tq-tier=weekly"], ["argument --tq-tier: invalid choice: 'weekly' (choose from"]),
}
try:
    if not torch.cuda.is_available():
        PYTEST["target-cuda-missing"] = (["--tq-target=torch-cuda"], ["--tq-target asked for torch-cuda: no CUDA device"])
except Exception:  # noqa: BLE001
    pass
PYTEST["corpus"] = (["--tq-corpus=/nonexistent/corpus.txt"], ["--tq-corpus must be a readable text file"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every CLI and pytest subprocess of the catalogue, run two at a time; id -> CompletedProcess."""
    afile = tmp_path_factory.mktemp("cli") / "a-file"
    afile.write_text("not a folder")
    jobs = {}
    for name, (argv, env, _) in CLI.items():
        argv = [a.replace("{file}", str(afile)) for a in argv]
        jobs[("cli", name)] = ([sys.executable, "-m", "tq_core.cli", *argv], _env(**env))
    for name, (opts, _) in PYTEST.items():
        jobs[("pytest", name)] = ([sys.executable, "-m", "pytest", "suites/test_memory.py", "--collect-only", "-q",
                                   "-p", "no:cacheprovider", "--tq-no-results", *opts], _env())

    def run(cmd_env):
        cmd, env = cmd_env
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(jobs, pool.map(run, jobs.values())))
    return done, afile


@pytest.mark.parametrize("name", list(CLI))
def test_cli(runs, name):
    """One line ``tq: error: ...``, exit 2, no traceback, nothing on stdout, no model loaded first."""
    done, afile = runs
    r = done[("cli", name)]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Loading weights" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tq: error: "), r.stderr
    for w in CLI[name][2]:
        assert w.replace("{file}", str(afile)) in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("name", list(PYTEST))
def test_pytest_option(runs, name):
    """A bad harness option is one usage error (``ERROR: ...``, exit 4), not a traceback, and no test runs."""
    done, _ = runs
    r = done[("pytest", name)]
    out = r.stdout + r.stderr
    assert r.returncode == 4, (r.returncode, out[-2000:])
    assert "Traceback" not in out and "INTERNALERROR" not in out, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("ERROR:") or "error:" in line]
    assert errors, out
    words = PYTEST.get(name, ([], []))[1]
    assert all(any(w in e for e in errors) for w in words), (words, errors)
    assert "passed" not in out and "collected" not in out
