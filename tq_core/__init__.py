"""tq_core: TurboQuant KV-cache compression for torch and MLX, with honest bytes.

    >>> import torch, tq_core
    >>> q = tq_core.TurboQuantizer(128, bits=3)
    >>> enc = q.encode(torch.randn(1000, 128))
    >>> enc.nbytes          # packed codes + fp16 norms actually held
    50000
    >>> x_hat = q.decode(enc)

``tq_core.patch(model, bits_k=4, bits_v=2)`` (or ``config="K4V2+s4w128"``) makes a transformers or
mlx-lm model generate with the compressed cache, attention reading its codes;
``tq_core.unpatch(model)`` restores it. KV methods are registered in ``tq_core.METHODS``. No backend
is imported until used, and importing has no other side effects.
"""

from .config import CacheConfig
from .methods import METHODS
from .quantizer import Encoded, TurboQuantizer

__version__ = "0.1.0"
__all__ = ["CacheConfig", "Encoded", "METHODS", "TurboQuantizer", "patch", "unpatch", "__version__"]


def __getattr__(name):
    if name in ("patch", "unpatch"):
        from .integrations import patch as _patch

        return getattr(_patch, name)
    raise AttributeError(f"module 'tq_core' has no attribute {name!r}")
