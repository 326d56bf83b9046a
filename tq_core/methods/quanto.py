"""quanto: transformers' ``QuantizedCache`` with the optimum-quanto backend, a KIVI-style cache.

Per layer it holds every token older than its residual window as optimum-quanto integer codes of
``nbits`` (2 or 4) with a scale and a zero-point shift per group of ``q_group_size`` (64 by
default) consecutive channels of one token's head vector (axis 0, transformers' default and what
its docs recommend for quanto), in the model's dtype; the most recent tokens, fewer than
``residual_length``, stay in full precision. When the residual window fills, transformers
dequantizes the history, appends the window and quantizes it all again (each flush re-encodes
what was already encoded); the first call (a prefill) quantizes everything it is given.

Label ``quanto:K<b>V<b>+s0w<residual_length>[+g=<group size>]``: K and V share ``nbits`` in
transformers, there are no sinks, ``w`` is ``residual_length``. Torch hosts only.
"""

from __future__ import annotations

from .peer import Peer, check_host

INSTALL = "pip install 'tq-core[peers]'"


class Quanto(Peer):
    name = "quanto"
    hosts = ("torch",)
    requires = (("optimum.quanto", INSTALL),)
    library = "transformers QuantizedCache, optimum-quanto backend"
    bits = (2, 4)
    backend = "quanto"
    axis = 0  # transformers' docs: axis-key and axis-value 0 for the quanto backend

    def make_cache(self, lib: str, model, config):
        """transformers' ``QuantizedCache`` for ``model`` (a transformers model); ``Unsupported`` when
        the model has layers other than full attention or a head_dim the group size does not divide."""
        check_host(self, lib)
        from ..integrations import hf
        from ..models import geometry

        group = self.check_group(config, geometry(model.config).head_dim)
        return hf.quantized_cache(model, self.backend, config.bits_k, group, config.window, self.axis)
