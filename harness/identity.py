"""What model a run measured: its geometry, its layer types and the hash of its weights.

``geometry(config)`` (from ``tq_core.models``) is the one reader of a model config's KV shape;
``layer_types(config)`` says which kind of attention each layer runs (``full_attention``,
``sliding_attention``, ``linear_attention``, ...), so suites can tell the layers a cache compresses
from those it keeps as the host library does. ``weights_sha256`` hashes the safetensors a folder
holds (cached beside them, keyed by size and mtime); ``describe`` puts them together for a model
spec without loading weights, and ``model_id`` names a spec the way results and calibration tables
do.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from tq_core.models import Geometry, geometry  # noqa: F401  (the one reader of a config's KV shape)
from tq_core.models import _file_sha256, _read_json

HASH_CACHE_FILE = ".tq_weights_sha256.json"


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of the weights at ``path`` (a .safetensors file or a model folder).

    One file: its plain sha256.  Several shards: sha256 over lines
    ``"<name> <sha256>\\n"`` in name order.  Per-file digests are cached in
    ``.tq_weights_sha256.json`` next to the weights, keyed by size and mtime,
    so they are computed once (a read-only folder just means no caching).
    """
    path = pathlib.Path(path).expanduser()
    files = _safetensors_files(path)
    cache_path = files[0].parent / HASH_CACHE_FILE
    cache = _read_json(cache_path) or {}
    digests: list[tuple[str, str]] = []
    changed = False
    for f in files:
        st = f.stat()
        entry = cache.get(f.name)
        if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            digest = entry["sha256"]
        else:
            digest = _file_sha256(f)
            cache[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        digests.append((f.name, digest))
    if changed:
        try:
            tmp = cache_path.with_name(f"{HASH_CACHE_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, cache_path)
        except OSError:
            pass
    if len(digests) == 1:
        return digests[0][1]
    h = hashlib.sha256()
    for name, digest in digests:
        h.update(f"{name} {digest}\n".encode())
    return h.hexdigest()


FULL_ATTENTION = "full_attention"


def layer_types(cfg) -> tuple[str, ...]:
    """Attention type of every decoder layer of a transformers config, an mlx-lm ``ModelArgs`` or a
    ``config.json`` dict: the config's own ``layer_types`` when it has them, else what transformers
    infers (a ``sliding_window`` / ``attention_chunk_size`` on the config), else full attention."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    elif isinstance(cfg, dict) and "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]

    def get(name):
        return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)

    n = int(get("num_hidden_layers"))
    types = get("layer_types")
    if types is None and not isinstance(cfg, dict):
        try:  # transformers' own inference (sliding_window, attention_chunk_size, per-layer configs)
            from transformers import cache_utils

            types = cache_utils.get_layer_types_and_kwargs(cfg)[0]
        except Exception:  # older transformers, or not a transformers config
            types = None
    if types is None:
        types = [FULL_ATTENTION] * n
    types = tuple(str(t) for t in types)
    if len(types) != n:
        raise ValueError(f"config has {n} layers but {len(types)} layer types: {types}")
    return types


def full_attention_layers(types) -> list[int]:
    """Indices of the layers that attend over their whole history (the ones a cache compresses)."""
    return [i for i, t in enumerate(types) if t == FULL_ATTENTION]


def type_counts(types) -> dict:
    """``{layer type: count}`` in first-seen order (what a run records about a model's layers)."""
    out: dict = {}
    for t in types:
        out[t] = out.get(t, 0) + 1
    return out


def model_id(model: str | os.PathLike | None) -> str:
    """The name results and calibration tables use for a model spec: the default's alias, else the
    last part of the path or hub id, without a ``.gguf`` suffix (``/data/ckpt/gemma-3-1b``,
    ``google/gemma-3-1b`` and ``/data/gemma-3-1b.gguf`` all name ``gemma-3-1b``; the weights hash
    tells them apart)."""
    from tq_core import models

    if model is None or str(model).strip().lower() in models.ALIASES:
        return models.DEFAULT_MODEL
    name = str(model).rstrip("/").rstrip(os.sep).split("/")[-1].split(os.sep)[-1]
    return name[:-len(".gguf")] if name.lower().endswith(".gguf") and len(name) > len(".gguf") else name


def _hub_snapshot(repo_id: str) -> pathlib.Path | None:
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def describe(model: str | os.PathLike | None = None) -> dict:
    """Identity and KV-cache geometry of a model spec (no weights are loaded).

    Keys: ``model`` (the spec, or the alias for the default), ``path`` (local folder or None),
    ``weights_sha256`` (None if not local), ``model_type``, ``num_layers``, ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``hidden_size``, ``rope_theta``, ``layer_types`` (``{type:
    count}``), ``source`` (tq_source.json).
    """
    from tq_core import models

    src = models.ensure_local(model)
    local = src if isinstance(src, pathlib.Path) else _hub_snapshot(src)
    if local is not None and (local / "config.json").is_file():
        cfg = _read_json(local / "config.json") or {}
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(src)).to_dict()
    geo = geometry(cfg)
    types = layer_types(cfg)
    text = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    weights = None
    if local is not None:
        try:
            weights = weights_sha256(local)
        except FileNotFoundError:
            weights = None
    return {
        "model": models.DEFAULT_MODEL if model is None else str(model),
        "path": str(local) if local is not None else None,
        "weights_sha256": weights,
        "model_type": geo.model_type,
        "num_layers": geo.layers,
        "num_heads": geo.heads,
        "num_kv_heads": geo.kv_heads,
        "head_dim": geo.head_dim,
        "hidden_size": text.get("hidden_size"),
        "rope_theta": models._rope_theta_of(text),
        "layer_types": type_counts(types),
        "source": _read_json(local / models.SOURCE_FILE) if local is not None else None,
    }
