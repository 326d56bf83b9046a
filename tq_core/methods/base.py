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


class Unsupported(ValueError):
    """A method cannot hold this model's cache in this host library (the message says why and what
    would work). The harness turns it into a skip with that reason: a measurement that cannot be
    made is reported, never counted as a failure of the cache."""


class Method:
    """A registered KV method: validates its options, names them in labels, builds codecs.

    ``hosts``: the host libraries it runs in, as the harness's host objects name them (their
    ``lib``: "torch", "mlx", "llama.cpp"). ``peer``: another project's cache, measured beside
    TurboQuant through the model and reported, never gated; it has no codec, and the host library
    builds its cache (``make_cache``). ``requires``: (importable module, pip install line) pairs it
    needs beyond the host library; ``missing()`` names the first one that is not installed.
    """

    name: str = ""
    options: tuple = ()  # CacheConfig fields this method reads beyond bits/sinks/window/seed
    hosts: tuple[str, ...] = ("torch", "mlx")
    peer: bool = False
    requires: tuple[tuple[str, str], ...] = ()

    def missing(self) -> str | None:
        """Why this method cannot run here (a module it needs is not installed, with the install
        line), or None. Looks the modules up without importing them."""
        import importlib.util

        for module, install in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a parent package missing, or a broken one
                found = False
            if not found:
                return f"{self.name}: {module} is not installed ({install})"
        return None

    def make_cache(self, lib: str, model, config):
        """The host library's own cache object for the whole ``model`` (a transformers ``Cache``, a
        list of mlx-lm per-layer caches): peers only; TurboQuant and uniform caches are built by the
        integrations around ``tq_core.kvstore``."""
        raise NotImplementedError(f"method {self.name!r} has no cache of its own: the integrations build "
                                  "TurboQuant-style caches from its codecs")

    def check_config(self, config) -> None:
        """Refuse options that belong to another method (they would be silently ignored)."""
        from ..config import CacheConfig

        default = CacheConfig.__dataclass_fields__
        for name in ("norm_correction", "center", "group_size", "variant"):
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
