"""KV methods: how a cache encodes the history it holds. One file per method, one registry line each.

A *method* turns a ``CacheConfig`` into one *codec* per (layer, K or V). The layer store
(``tq_core.kvstore``) holds what a codec produces in preallocated buffers and never looks inside:

    codec.fields()             {name: (trailing shape, dtype name)} held per vector, e.g.
                               TurboQuant {"codes": ((bytes,), "uint8"), "norms": ((), "float16")}
    codec.encode(x)            x (..., dim) float -> {name: array (..., *trailing)}   (no host sync)
    codec.decode(parts, dtype) -> (..., dim): what attention reads back (the reference path)

Attention over what is held, without decoding it back to the original space (the fast path; a
method that has nothing better inherits the decoded one from ``Codec``):

    codec.query(q)                  the query in the method's space (TurboQuant: rotated once)
    codec.values_space(parts)       (..., n, dim) vectors in that space (TurboQuant: s * c[code],
                                    no rotation); scores are query . values_space
    codec.output(u)                 back to the original space (TurboQuant: one rotation of the output)

Bytes held are never computed by a method: the store counts the arrays it holds.

Peers (``Method.peer``: quanto, hqq, mlxkv, ...) are other projects' caches, registered here so every
suite that measures through the model measures them beside TurboQuant: they have no codec; the host
library builds their cache (``Method.make_cache(lib, model, config)``) in the host libraries they
run in (``Method.hosts``), when what they import is installed (``Method.requires``/``missing()``),
and the host objects count their bytes from the peer's own tensors. ``Unsupported`` is raised
where a method cannot hold a given model's cache (the harness skips with its reason).
"""

from __future__ import annotations

from .base import Codec, Method, Unsupported
from .hqq import HQQ
from .mlxkv import MLXKV
from .quanto import Quanto
from .turboquant import TurboQuant
from .uniform import Uniform
from .llamacpp import LlamaCpp

# name -> method, ordered easy -> hard to read: the reference first, then the simple baseline.
METHODS: dict[str, Method] = {
    "turboquant": TurboQuant(),
    "uniform": Uniform(),
    # peers: other projects' caches, measured beside TurboQuant through the model, never gated
    "quanto": Quanto(),
    "hqq": HQQ(),
    "mlxkv": MLXKV(),
    "llamacpp": LlamaCpp(),
}


def get(name: str) -> Method:
    """The registered method ``name``; one clear error naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None


__all__ = ["Codec", "Method", "METHODS", "Unsupported", "get"]
