"""What the peer methods share: another project's KV cache, measured beside TurboQuant.

A peer is configured by a label like any method (``quanto:K4V4+s0w128``) and built by its host
library as that library builds it (``Method.make_cache``), so it is measured through the model on
the same tokens and protocol as TurboQuant, and its bytes are counted from its own tensors (codes,
scales, zero points, residual window) by the host objects. It has no codec: suites that measure a
codec directly (MSE, attention over captured K/V, kernel speed) skip it.

The peers quantize keys and values with one bit width and no attention sinks; ``window`` is their
full-precision recent window where they have one. ``g=<int>`` sets the group size (channels per
scale/zero pair); 0, the default, leaves the library's own default (64), and the label shows ``g``
only when it is set.
"""

from __future__ import annotations

from .base import Method, Unsupported

NO_CODEC = "peer caches are measured through the model; there is no codec to measure here"


class Peer(Method):
    peer = True
    options = ("group_size",)
    library = ""  # what the cache is, for messages, e.g. "mlx-lm QuantizedKVCache"
    bits: tuple[int, ...] = ()  # bit widths the library takes
    bits_note = ""  # why a width the library names is refused here, if one is
    group_sizes: tuple[int, ...] | None = None  # group sizes the library takes (None: any that fits the model)
    default_group = 64
    windowed = True  # it has a full-precision recent window (``window``)

    def check_config(self, config) -> None:
        super().check_config(config)
        name = self.name
        if config.bits_k != config.bits_v:
            raise ValueError(f"{name} quantizes keys and values with one bit width: bits_k must equal bits_v, "
                             f"got K{config.bits_k}V{config.bits_v}")
        if config.bits_k not in self.bits:
            raise ValueError(f"bits for {name} must be one of {', '.join(map(str, self.bits))}{self.bits_note}, "
                             f"got {config.bits_k}")
        if config.sliding != "keep":
            raise ValueError(f"sliding is not an option of {name}: it holds sliding-window layers as {self.library} "
                             f"does (got sliding={config.sliding!r})")
        if config.sinks:
            raise ValueError(f"sinks must be 0 for {name} ({self.library} keeps no attention sinks), "
                             f"got {config.sinks}")
        if not self.windowed and config.window:
            raise ValueError(f"window must be 0 for {name} ({self.library} quantizes from the first token), "
                             f"got {config.window}")
        if config.seed:
            raise ValueError(f"seed is not an option of method {name!r} (nothing of it is random), got {config.seed}")
        if config.group_size and self.group_sizes is not None and config.group_size not in self.group_sizes:
            raise ValueError(f"group_size for {name} must be one of {', '.join(map(str, self.group_sizes))} "
                             f"(g=<size>), got {config.group_size}")

    def group(self, config) -> int:
        """Channels per scale/zero pair: the config's, else the library's default."""
        return config.group_size or self.default_group

    def label_options(self, config) -> list[str]:
        return [f"g={config.group_size}"] if config.group_size else []

    def parse_option(self, key: str, value: str) -> dict:
        if key == "g" and value.isdigit() and int(value) > 0:
            return {"group_size": int(value)}
        raise ValueError(f"unknown option {key}={value!r} for method {self.name!r} (allowed: g=<group size>)")

    def codec(self, config, layer: int, kind: str, dim: int):
        raise ValueError(f"{config.label} is a peer cache ({self.library}) with no codec of tq_core's: "
                         f"build it with its host library (Method.make_cache; {NO_CODEC})")

    def check_group(self, config, head_dim: int) -> int:
        """The group size, when it divides ``head_dim`` (groups never straddle two vectors);
        ``Unsupported`` otherwise."""
        g = self.group(config)
        if head_dim % g:
            raise Unsupported(f"{config.label}: group size {g} does not divide this model's head_dim {head_dim} "
                              f"(g=<size> sets another)")
        return g


def check_host(method: Method, lib: str) -> None:
    """``lib`` is one of the host libraries ``method`` runs in; one clear ValueError otherwise."""
    if lib not in method.hosts:
        raise ValueError(f"lib for {method.name} must be one of {', '.join(method.hosts)}, got {lib!r}")
    missing = method.missing()
    if missing:
        raise Unsupported(missing)
