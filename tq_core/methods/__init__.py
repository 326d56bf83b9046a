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
"""

from __future__ import annotations

from .base import Codec, Method
from .turboquant import TurboQuant
from .uniform import Uniform

# name -> method, ordered easy -> hard to read: the reference first, then the simple baseline.
METHODS: dict[str, Method] = {
    "turboquant": TurboQuant(),
    "uniform": Uniform(),
}


def get(name: str) -> Method:
    """The registered method ``name``; one clear error naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None


__all__ = ["Codec", "Method", "METHODS", "get"]
