"""The window ring of a static decode step (``tq_core.graph_step``): one launch writes the step's new
token into the ring slot the device clock names.

    ring_write(k, v, ring_k, ring_v, clock)

``k``, ``v``: (B, H, 1, D), the new token; ``ring_k``, ``ring_v``: (B, H, W, D) contiguous; ``clock``:
(1,) int64 tensor t; the token goes to slot ``t % W`` of every (batch, head) row, cast to the ring's
dtype. The encode of the token that leaves that slot (``encode.encode_pair_into(..., at=...)``) must
run before it, on the same stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ring_write_kernel(KN, s_kb, s_kh, VN, s_vb, s_vh, RK, RV, s_rr, s_rs, CLOCK, ring_w, HKV,
                       D: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0)
    b = row // HKV
    h = row % HKV
    slot = tl.load(CLOCK) % ring_w
    d = tl.arange(0, BD)
    m = d < D
    k = tl.load(KN + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + d, mask=m)
    v = tl.load(VN + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + d, mask=m)
    dst = row.to(tl.int64) * s_rr + slot * s_rs + d
    tl.store(RK + dst, k.to(RK.dtype.element_ty), mask=m)
    tl.store(RV + dst, v.to(RV.dtype.element_ty), mask=m)


def ring_write(k, v, ring_k, ring_v, clock) -> None:
    B, H, W, D = ring_k.shape
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (B, H, 1, D) or x.stride(3) != 1 or x.device != ring_k.device:
            raise ValueError(f"{name} must be ({B}, {H}, 1, {D}) on {ring_k.device}, last axis contiguous; "
                             f"got {tuple(x.shape)}")
    if not (ring_k.is_contiguous() and ring_v.is_contiguous() and ring_v.shape == ring_k.shape):
        raise ValueError("ring_k and ring_v must be contiguous tensors of one shape")
    if clock.dtype != torch.int64 or clock.numel() != 1:
        raise ValueError("clock must be a (1,) int64 tensor")
    _ring_write_kernel[(B * H,)](k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), ring_k, ring_v,
                                 ring_k.stride(1), ring_k.stride(2), clock, W, H,
                                 D=D, BD=max(16, 1 << (D - 1).bit_length()))
