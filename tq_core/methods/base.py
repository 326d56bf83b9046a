"""What a KV method provides (see ``tq_core.methods``), and the decoded reference path."""

from __future__ import annotations

from ..ops import for_array


class Codec:
    """Encodes and decodes vectors of one (layer, K or V); subclasses give ``fields``/``encode``/``decode``.

    The attention helpers below are the reference path in the original space: a method with a
    cheaper space to attend in (TurboQuant's rotated one) overrides all three together.
    """

    dim: int
    bits: int

    def fields(self) -> dict:
        raise NotImplementedError

    def encode(self, x) -> dict:
        raise NotImplementedError

    def decode(self, parts: dict, dtype=None):
        raise NotImplementedError

    def encode_into(self, x, out: dict) -> bool:
        """Encode ``x`` (B, H, t, dim) straight into ``out``'s views of the held buffers, {field: (B, H,
        t, *trailing)}, where the device has a kernel that writes in place; False (nothing written)
        when it does not, and the caller stores ``encode(x)`` instead."""
        return False

    # ---- attention over what is held ---------------------------------------------------------
    def query(self, q):
        """``q`` (..., dim) in the space ``values_space`` returns vectors in."""
        return q

    def values_space(self, parts: dict, dtype):
        """Held vectors (..., n, dim) in the attention space, as ``dtype``."""
        return self.decode(parts, dtype)

    def output(self, u):
        """A weighted sum of ``values_space`` vectors back in the original space."""
        return u


class Method:
    """A registered KV method: validates its options, names them in labels, builds codecs."""

    name: str = ""
    options: tuple = ()  # CacheConfig fields this method reads beyond bits/sinks/window/seed

    def check_config(self, config) -> None:
        """Refuse options that belong to another method (they would be silently ignored)."""
        from ..config import CacheConfig

        default = CacheConfig.__dataclass_fields__
        for name in ("norm_correction", "group_size"):
            if name not in self.options and getattr(config, name) != default[name].default:
                raise ValueError(f"{name} is not an option of method {self.name!r} "
                                 f"(its options: {', '.join(self.options) or 'none'})")

    def label_options(self, config) -> list[str]:
        return []

    def parse_option(self, key: str, value: str) -> dict:
        raise ValueError(f"unknown option {key!r} for method {self.name!r}")

    def codec(self, config, layer: int, kind: str, dim: int) -> Codec:
        raise NotImplementedError


def nbytes(x) -> int:
    return for_array(x).nbytes(x)
