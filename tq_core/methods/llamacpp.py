"""llama.cpp's own KV cache types (``--cache-type-k/-v``), measured as a peer inside llama.cpp.

llama.cpp stores K and V in ggml block formats of 32 values each: a per-block fp16 scale (and,
for the ``_1`` types, an fp16 minimum) and the values' codes. Every position, the one being
decoded included, is written into the cache before attention reads it back, so each scored
token attends to its own rounded K/V too; there are no sinks and no full-precision window.

Labels: ``llamacpp:K<b>V<b>+s0w0[+t=1|+t=nl]``, for K and V independently: 8 -> q8_0, 5 -> q5_0,
4 -> q4_0; ``t=1`` takes the affine types for 5 and 4 bits (q5_1, q4_1), ``t=nl`` the
non-linear 4-bit type (iq4_nl). ``llamacpp:K8V4+s0w0`` is llama.cpp's ``-ctk q8_0 -ctv q4_0``.

The codes are llama.cpp's: this method has no codec of its own (it runs in the llama.cpp host
only, ``harness.hosts.llamacpp_host``); ``make_cache`` builds a llama.cpp context holding the
cache (``tq_core.integrations.llamacpp``). Bits per value include the block's scale (and minimum):
q8_0 34 B / 32 values = 8.5, q5_0 5.5, q5_1 6, q4_0 4.5, q4_1 5, iq4_nl 4.5; f16 16.
"""

from __future__ import annotations

from .base import Method

# ggml type name -> (ggml_type id, bytes per block, values per block), from ggml's type traits
# (ggml.c ``type_traits``; ids are ggml's ABI enum ``ggml_type``). f16 is the baseline's type.
GGML_TYPES = {
    "f16": (1, 2, 1),
    "q8_0": (8, 34, 32),
    "q5_1": (7, 24, 32),
    "q5_0": (6, 22, 32),
    "q4_1": (3, 20, 32),
    "q4_0": (2, 18, 32),
    "iq4_nl": (20, 18, 32),
}
# (bits, variant option) -> type; the variant "" is llama.cpp's plain symmetric type.
TYPE_OF = {(8, ""): "q8_0", (5, ""): "q5_0", (4, ""): "q4_0", (5, "1"): "q5_1", (4, "1"): "q4_1",
           (4, "nl"): "iq4_nl"}
VARIANTS = {"1": "q5_1/q4_1 for 5 and 4 bits", "nl": "iq4_nl for 4 bits"}
INSTALL = "pip install 'tq-core[peers]'"


def bytes_per_value(type_name: str) -> float:
    """Bytes one K or V value takes in llama.cpp's cache of type ``type_name`` (block scale included)."""
    _, size, block = GGML_TYPES[type_name]
    return size / block


class LlamaCpp(Method):
    """llama.cpp's KV cache quantization types, run in llama.cpp itself (see the module docstring)."""

    name = "llamacpp"
    options = ("variant",)
    hosts = ("llama.cpp",)
    peer = True
    requires = (("llama_cpp", INSTALL),)

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.variant and config.variant not in VARIANTS:
            raise ValueError(f"variant of method 'llamacpp' must be one of "
                             f"{', '.join(f'{k!r} ({v})' for k, v in VARIANTS.items())} or '', got {config.variant!r}")
        for name in ("bits_k", "bits_v"):
            self.ggml_type(config, name)
        if config.sinks or config.window:
            raise ValueError(f"sinks and window must be 0 for method 'llamacpp' (llama.cpp's cache has neither), "
                             f"got sinks={config.sinks} window={config.window}")
        if config.seed:
            raise ValueError(f"seed must be 0 for method 'llamacpp' (llama.cpp's cache types are deterministic), "
                             f"got {config.seed}")
        if config.variant and not any((b, config.variant) in TYPE_OF and b != 8 for b in (config.bits_k, config.bits_v)):
            raise ValueError(f"variant {config.variant!r} of method 'llamacpp' changes {VARIANTS[config.variant]} "
                             f"only; K{config.bits_k}V{config.bits_v} has no such bits")

    def ggml_type(self, config, name: str) -> str:
        """The ggml type llama.cpp stores ``name`` ("bits_k" or "bits_v") of ``config`` in."""
        bits = getattr(config, name)
        variant = config.variant if bits != 8 else ""  # q8_0 is the only 8-bit cache type
        try:
            return TYPE_OF[(bits, variant)]
        except KeyError:
            allowed = ", ".join(f"{b} ({t})" for (b, v), t in TYPE_OF.items() if v == variant or b == 8)
            raise ValueError(f"{name} of method 'llamacpp'{f' with t={variant}' if variant else ''} must be one of "
                             f"{allowed} (llama.cpp's cache types), got {bits}") from None

    def types(self, config) -> tuple[str, str]:
        """(K type, V type) as ggml type names, e.g. ("q8_0", "q4_0")."""
        return self.ggml_type(config, "bits_k"), self.ggml_type(config, "bits_v")

    def label_options(self, config) -> list[str]:
        return [f"t={config.variant}"] if config.variant else []

    def parse_option(self, key: str, value: str) -> dict:
        if key == "t" and value in VARIANTS:
            return {"variant": value}
        raise ValueError(f"unknown option {key}={value!r} for method 'llamacpp' (allowed: "
                         f"{', '.join(f't={k} ({v})' for k, v in VARIANTS.items())})")

    def make_cache(self, lib: str, model, config, reserve: int = 0):
        """A llama.cpp context whose KV cache stores K and V in ``config``'s types (``model``: a
        ``tq_core.integrations.llamacpp.LlamaModel``), with room for ``reserve`` tokens."""
        if lib not in self.hosts:
            raise ValueError(f"method 'llamacpp' runs in llama.cpp only ({', '.join(self.hosts)}), not in {lib!r}")
        from ..integrations import llamacpp

        type_k, type_v = self.types(config)
        return llamacpp.new_cache(model, type_k, type_v, n_ctx=reserve)
