"""Per-backend array shims: the codec is written once against these primitives.

`for_array(x)` picks the shim from the array's type without importing any backend that the
caller has not already imported, so numpy users never load torch and torch users never load mlx.
"""

from __future__ import annotations

import sys


def for_array(x):
    """Return the ops module that handles ``x`` (a torch tensor, an mlx array or a numpy array)."""
    mod = type(x).__module__
    if mod.startswith("torch") and "torch" in sys.modules:
        from . import torch_ops

        return torch_ops
    if mod.startswith("mlx"):
        from . import mlx_ops

        return mlx_ops
    if mod == "numpy":
        from . import numpy_ops

        return numpy_ops
    raise TypeError(
        f"x must be a torch.Tensor, an mlx.core.array or a numpy.ndarray, got {type(x).__name__}"
    )


def by_name(name: str):
    """Return the ops module named ``"torch"``, ``"mlx"`` or ``"numpy"``."""
    if name == "torch":
        from . import torch_ops as m
    elif name == "mlx":
        from . import mlx_ops as m
    elif name == "numpy":
        from . import numpy_ops as m
    else:
        raise ValueError(f"backend must be one of 'torch', 'mlx', 'numpy', got {name!r}")
    return m
