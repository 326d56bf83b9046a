"""Triton kernels over the packed TurboQuant format (CUDA; the Triton interpreter runs them on CPU).

    attend_codes(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids,
                 *, bits_k, bits_v, length, scale) -> (o_rot, lse)      decode_attention.py
    attend_step(q, scale, dense, *, q_rot, hist, length, rot_v, ...) -> out      decode_step.py
    encode_into(x, rot_t, boundaries, centroids, *, bits, norm_correction, codes_out, norms_out)
                                                                         encode.py
    encode_pair_into(xk, xv, k, v, *, norm_correction, at=None)  keys and values in one launch    encode.py
    ring_write(k, v, ring_k, ring_v, clock)   a static decode step's new token into its ring    ring.py

Importing this package does not import triton or torch: the names above load their module on
first use, so a machine without triton can import the package and ask ``available()`` -> (ok, reason).
See docs/kernels.md for the design and measured speed.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["attend_codes", "attend_step", "encode_into", "encode_pair_into", "ring_write", "available", "INSTALL_HINT"]

INSTALL_HINT = "triton not installed: pip install triton"
READS_DEVICE_CLOCK = True  # encode_pair_into takes ``at=`` (rows moved by a device clock: graph_step)

_LAZY = {"attend_codes": "decode_attention", "byte_tables": "decode_attention", "attend_step": "decode_step",
         "encode_into": "encode", "encode_pair_into": "encode",
         "symmetric": "encode", "ring_write": "ring"}


def available() -> tuple[bool, str]:
    """(ok, reason): whether triton is importable (the kernels also need CUDA, or
    TRITON_INTERPRET=1 on CPU) and, if not, what to install."""
    if importlib.util.find_spec("triton") is None:
        return False, INSTALL_HINT
    return True, ""


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not available()[0]:
        raise ImportError(INSTALL_HINT)
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
