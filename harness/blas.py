"""Which BLAS MLX uses on Linux CPU.

The Linux ``mlx[cpu]`` wheel links a bundled reference BLAS (netlib): a 512x576x1536 matmul runs
at ~6 GFLOP/s on a 2-core x86 box, against ~170 with a system OpenBLAS. ``use_openblas()`` loads
a system OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is first imported, so the dynamic
linker resolves MLX's BLAS symbols to it. Unlike ``LD_PRELOAD``, it leaves torch alone (torch
binds its own BLAS when imported; a preload, or an OpenBLAS loaded before torch, takes over
torch's float32 GEMV and slows its decoding ~1.4x; so torch, when installed, is imported first).

``TQ_MLX_BLAS`` chooses: unset = the first OpenBLAS found in ``CANDIDATES``; a path = that
library; ``off`` = the wheel's own BLAS. Nothing happens on macOS (Accelerate/Metal) or once
``mlx.core`` is imported (too late to change; ``status()`` then says what was in effect).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV = "TQ_MLX_BLAS"
HINT = "install a system OpenBLAS (apt-get install libopenblas0-pthread; harness/blas.py loads it)"
# Debian/Ubuntu (apt-get install libopenblas0-pthread), then the generic sonames.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "libopenblas.so.0",
)

_state: dict = {"status": None}


def _preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def _find() -> str | None:
    for path in CANDIDATES:
        if os.path.isabs(path) and os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def use_openblas() -> str:
    """Load a system OpenBLAS for MLX if possible; return what MLX will use (idempotent)."""
    if _state["status"] is not None:
        return _state["status"]
    choice = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux"):
        status = "platform default"
    elif importlib.util.find_spec("mlx") is None:
        status = "mlx not installed"
    elif "mlx.core" in sys.modules:
        status = "mlx wheel default (mlx imported before harness.blas)"
    elif _preloaded():
        status = "openblas (LD_PRELOAD)"
    elif choice.lower() == "off":
        status = f"mlx wheel default ({ENV}=off)"
    else:
        path = choice or _find()
        if not path:
            status = f"mlx wheel default (no system OpenBLAS: {HINT})"
        else:
            if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
                import torch  # noqa: F401  (binds torch to its own BLAS first, see above)
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                if choice:
                    raise ValueError(f"{ENV}={choice!r}: cannot load it as a BLAS library ({e}); "
                                     "give a path to an OpenBLAS .so, or 'off'") from None
                status = f"mlx wheel default ({path} failed to load)"
            else:
                status = f"openblas ({path})"
    _state["status"] = status
    return status


def status() -> str:
    """What ``use_openblas`` decided, or what is in effect if it was never called."""
    if _state["status"] is not None:
        return _state["status"]
    if _preloaded():
        return "openblas (LD_PRELOAD)"
    return "mlx wheel default" if sys.platform.startswith("linux") else "platform default"
