"""Fused kernels for TurboQuant caches, chosen per codec and device: attention over a compressed
history, and encoding (norm, rotation, codes, packing in one pass: Triton on CUDA; on CPU the C
library for a decode step's few rows, ``kernels/cpu/encode.c``).

``attention_step(codec_k, codec_v, q, kv_heads)`` returns a function that runs a whole attention
call (history, sinks, window and the call's own tokens, merged and rotated back) in two launches,
where the device's kernel module has one (Triton on CUDA, C on CPU); ``View.attend`` prefers it.

``history_attention(codec_k, codec_v, like)`` returns a function
``(q_space, hist_k, hist_v, length) -> (o_space, lse)`` that attends the rotated, scaled queries
``q_space`` (B, H, R, D) over the first ``length`` held tokens without decoding them, or ``None``
when no kernel applies (then ``View.attend`` uses the method's space in array ops, the portable
path). Kernels exist for TurboQuant codecs: Triton on CUDA (``kernels/triton``), C on CPU
(``kernels/cpu``). Each is held to the array-ops path and to the decoded reference by parity tests.
Which device gets which kernel is the ops shim's business (``ops.attention_kernel``).
"""

from __future__ import annotations

import math

from ..ops import for_array

from .step_args import MAX_DIM, MAX_ROWS  # query rows per KV head and head dims the whole-call kernels take


def _half(ops, dtype):
    """The model's dtype when it is 16-bit (the kernels' fast lookup), else None (their exact one)."""
    return dtype if dtype is not None and ops.dtype_name(dtype) in ("float16", "bfloat16") else None


def _tables(kernel, qk, qv, half) -> dict:
    """The byte-permute lookup tables of both codebooks, kept by their quantizers."""
    if half is None or getattr(kernel, "byte_tables", None) is None:
        return {}
    return {"k_table": qk.derived("byte_tables", lambda c: kernel.byte_tables(c, qk.bits)),
            "v_table": qv.derived("byte_tables", lambda c: kernel.byte_tables(c, qv.bits))}


def _turboquant(codec_k, codec_v) -> bool:
    from ..methods.turboquant import TurboQuantCodec

    return isinstance(codec_k, TurboQuantCodec) and isinstance(codec_v, TurboQuantCodec)


def history_attention(codec_k, codec_v, like, dtype=None):
    """The fused kernel for this codec pair on ``like``'s device, or None. ``dtype``: the model's
    dtype; 16-bit queries take the kernels' fast lookup, float32 their exact one."""
    if not _turboquant(codec_k, codec_v) or like.shape[-2] > MAX_ROWS:
        return None
    ops = for_array(like)
    kernel = ops.attention_kernel(like)
    if kernel is None:
        return None
    qk, qv = codec_k.q, codec_v.q
    f32 = ops.float32
    half = _half(ops, dtype)
    tables = _tables(kernel, qk, qv, half)

    def run(q_space, hist_k: dict, hist_v: dict, length: int):
        q_in = q_space if half is None else ops.astype(q_space, half)
        o, lse = kernel.attend_codes(q_in, hist_k["codes"], hist_k["norms"], hist_v["codes"], hist_v["norms"],
                        qk.const("centroids", like, f32), qv.const("centroids", like, f32),
                        bits_k=qk.bits, bits_v=qv.bits, length=length, scale=1.0, **tables)
        return o, lse[..., None]

    return run


def attention_step(codec_k, codec_v, q, kv_heads: int):
    """The whole attention call in fused kernels for this codec pair and ``q`` (B, Hq, Tq, D), or None.

    Returns ``(q, dense, hist_k, hist_v, length, scale, length_dev=None, length_base=0, out=None) -> out``
    (B, Hq, Tq, D) in ``q``'s dtype, for any ``q`` of the same shape, dtype and device (a cache keeps
    it per layer): ``dense`` = (sinks, window, own tokens) as (k, v) pairs or None (see the device
    kernel's ``attend_step``), the history's fields and held length; ``length_dev`` (a (1,) int64
    device tensor t) makes the kernels read ``length_base + t`` tokens, at most ``length``, on the
    device (``tq_core.graph_step``); ``out`` is written into when given. On CUDA 16-bit queries are
    rotated by one GEMM in their own dtype (R rounded to it, float32 accumulation: the kernels read
    16-bit rotated queries anyway); on CPU in float32. Devices whose kernel module has an
    ``attend_step`` get one (Triton on CUDA, the C library on CPU); elsewhere ``View.attend``
    composes the history kernel with array ops.
    """
    if not _turboquant(codec_k, codec_v):
        return None
    ops = for_array(q)
    kernel = ops.attention_kernel(q)
    if kernel is None:
        return None
    step = getattr(kernel, "attend_step", None)
    if (step is None or q.shape[1] // kv_heads * q.shape[2] > MAX_ROWS or q.shape[-1] > MAX_DIM
            or ops.dtype_name(q.dtype) not in ("float32", "float16", "bfloat16")):  # the kernels' queries
        return None
    qk, qv = codec_k.q, codec_v.q
    f32 = ops.float32
    # 16-bit rotated queries where the kernel has the byte-permute lookup (CUDA); float32 elsewhere
    half = _half(ops, q.dtype) if getattr(kernel, "byte_tables", None) is not None else None
    tables = _tables(kernel, qk, qv, half)

    rot_k = qk.const("rot_t", q, f32 if half is None else half)
    rot_v = qv.const("rot", q, f32)
    centroids = {"k_centroids": qk.const("centroids", q, f32), "v_centroids": qv.const("centroids", q, f32)}

    def run(q, dense, hist_k: dict, hist_v: dict, length: int, scale: float, length_dev=None, length_base=0,
            out=None):
        q_rot = None
        if length:
            q_rot = ops.matmul(q if half is not None else ops.astype(q, f32), rot_k)
        return step(q, scale, dense, q_rot=q_rot, length=length,
                    hist=(hist_k["codes"], hist_k["norms"], hist_v["codes"], hist_v["norms"]) if length else None,
                    rot_v=rot_v if length else None, bits_k=qk.bits, bits_v=qv.bits, **centroids, **tables,
                    **({} if length_dev is None else {"length_dev": length_dev, "length_base": length_base}),
                    **({} if out is None else {"out": out}))

    return run


def encode_into(quantizer, x, codes, norms) -> bool:
    """Encode ``x`` (B, H, t, D) with the device's fused kernel straight into ``codes`` (B, H, t, bytes)
    and ``norms`` (B, H, t), views of a cache's buffers; False (nothing written) when the device has
    no kernel or the views cannot be walked as rows of one stride (then the caller copies)."""
    ops = for_array(x)
    module = ops.encode_kernel(x)
    if not _encodes(module, quantizer, x, ops):
        return False
    out = _rows(codes, norms)
    if out is None:
        return False
    _encode_rows(module, quantizer, ops.reshape(x, (-1, x.shape[-1])), *out)
    return True


def _rows(codes, norms):
    """(codes, norms) views of (B, H, t, ...) buffer slots as (B * H * t) rows of one stride, or None
    when they are not (a one-token slot of a contiguous buffer is; a prefill's many tokens per head
    are not): the fused encode then writes them in place, no copy."""
    rows = codes.shape[0] * codes.shape[1] * codes.shape[2]
    try:
        return codes.view(rows, codes.shape[-1]), norms.view(rows)
    except RuntimeError:
        return None


def encode_pair_into(codec_k, codec_v, k, v, out_k: dict, out_v: dict) -> bool:
    """Encode keys ``k`` and values ``v`` (B, H, t, D) of the same tokens in one fused launch straight
    into their buffers' views (``out_k``/``out_v``: {"codes": (B, H, t, bytes), "norms": (B, H, t)});
    False (nothing written) where that kernel does not apply (then each kind is encoded on its own)."""
    module = _pair_kernel(codec_k, codec_v, out_k, out_v, k, v)
    if module is None:
        return False
    qk, qv = codec_k.q, codec_v.q
    ops = for_array(k)
    views = [_rows(out["codes"], out["norms"]) for out in (out_k, out_v)]
    if None in views:
        return False
    kinds = [dict(_encode_args(module, q, k), codes=c, norms=n) for q, (c, n) in zip((qk, qv), views)]
    d = k.shape[-1]
    module.encode_pair_into(ops.reshape(k, (-1, d)), ops.reshape(v, (-1, d)), *kinds,
                            norm_correction=qk.norm_correction)
    return True


def _pair_kernel(codec_k, codec_v, out_k: dict, out_v: dict, k, v):
    """The device's module whose ``encode_pair_into`` takes these codecs (TurboQuant's own fields, one
    norm correction) and inputs ``k``, ``v`` (one shape and dtype), or None."""
    if not (_turboquant(codec_k, codec_v) and codec_k.fused and codec_v.fused
            and set(out_k) == set(out_v) == {"codes", "norms"}):  # TurboQuant's own fields only
        return None
    ops = for_array(k)
    module = ops.encode_kernel(k)
    qk, qv = codec_k.q, codec_v.q
    if (getattr(module, "encode_pair_into", None) is None or not _encodes(module, qk, k, ops)
            or not _encodes(module, qv, v, ops) or qk.norm_correction != qv.norm_correction
            or tuple(k.shape) != tuple(v.shape) or k.dtype != v.dtype):
        return None
    return module


def spill_at(codec_k, codec_v, ring_k, ring_v, hist_k: dict, hist_v: dict, clock, base: int) -> bool:
    """A static decode step's spill (``tq_core.graph_step``) in one launch: the keys and values at ring
    slot ``t % W`` of ``ring_k``/``ring_v`` (B, H, W, D) encoded into the history buffers ``hist_k``/
    ``hist_v`` (fields (B, H, capacity, ...)) at position ``base + t``, t read from ``clock`` on the
    device. False (nothing written) where the device has no such kernel."""
    module = _pair_kernel(codec_k, codec_v, hist_k, hist_v, ring_k, ring_v)
    if (module is None or not getattr(module, "READS_DEVICE_CLOCK", False) or not ring_k.is_contiguous()
            or not ring_v.is_contiguous()):
        return False
    qk, qv = codec_k.q, codec_v.q
    views = [_rows(h["codes"][:, :, :1], h["norms"][:, :, :1]) for h in (hist_k, hist_v)]
    if None in views:
        return False
    d = ring_k.shape[-1]
    xk, xv = (r[:, :, 0].view(-1, d) for r in (ring_k, ring_v))  # slot 0 of every row; t moves it
    kinds = [dict(_encode_args(module, q, ring_k), codes=c, norms=n) for q, (c, n) in zip((qk, qv), views)]
    strides = (ring_k.stride(2), hist_k["codes"].stride(2), hist_k["norms"].stride(2),
               ring_v.stride(2), hist_v["codes"].stride(2), hist_v["norms"].stride(2))
    module.encode_pair_into(xk, xv, *kinds, norm_correction=qk.norm_correction,
                            at={"clock": clock, "ring": ring_k.shape[2], "base": int(base), "strides": strides})
    return True


def ring_write(k, v, ring_k, ring_v, clock) -> bool:
    """The new token ``k``, ``v`` (B, H, 1, D) into slot ``t % W`` of the rings, t from ``clock`` on the
    device, in one launch; False (nothing written) where the device has no such kernel."""
    module = for_array(ring_k).encode_kernel(ring_k)
    if getattr(module, "ring_write", None) is None:
        return False
    module.ring_write(k, v, ring_k, ring_v, clock)
    return True


def _encode_args(module, quantizer, like) -> dict:
    """The constants the fused encode reads for ``quantizer`` on ``like``'s device (made once per
    kernel module and device, kept by the quantizer: a decode step asks for them every layer)."""
    ops = for_array(like)

    def build(c):
        f32 = ops.float32
        return {"rot_t": quantizer.const("rot_t", like, f32), "boundaries": quantizer.const("boundaries", like, f32),
                "centroids": quantizer.const("centroids", like, f32), "bits": quantizer.bits,
                "symmetric": module.symmetric(quantizer.codebook.boundaries, c, quantizer.bits)}

    return quantizer.derived(f"encode_args {module.__name__} {ops.NAME} {ops.device_key(like)}", build)


def _encodes(module, quantizer, x, ops) -> bool:
    """Whether the fused encode kernel takes this quantizer and input (and its row count: the CPU's
    takes a decode step's few rows, ``ENCODE_MAX_ROWS``; a prefill's stay with the array ops)."""
    if module is None or quantizer.precision != "float32" or ops.dtype_name(x.dtype) not in (
            "float32", "float16", "bfloat16"):  # the kernel's inputs
        return False
    most = getattr(module, "ENCODE_MAX_ROWS", None)
    return most is None or math.prod(x.shape[:-1]) <= most


def _encode_rows(module, quantizer, rows, codes, norms) -> None:
    a = _encode_args(module, quantizer, rows)
    module.encode_into(rows, a["rot_t"], a["boundaries"], a["centroids"], bits=quantizer.bits,
                       norm_correction=quantizer.norm_correction, codes_out=codes, norms_out=norms,
                       is_symmetric=a["symmetric"])


def encode(quantizer, x):
    """``(codes, norms)`` of ``x`` (..., D) from the fused encode kernel of ``x``'s device, or None
    when there is none (then ``TurboQuantizer.encode`` runs as array ops). Same codes as the array
    ops up to float32 rounding at a boundary (parity-tested)."""
    ops = for_array(x)
    module = ops.encode_kernel(x)
    if not _encodes(module, quantizer, x, ops):
        return None
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    rows = ops.reshape(x, (-1, d))
    codes = ops.empty((rows.shape[0], quantizer.code_bytes), ops.uint8, x)
    norms = ops.empty((rows.shape[0],), ops.float16, x)
    _encode_rows(module, quantizer, rows, codes, norms)
    return ops.reshape(codes, lead + (quantizer.code_bytes,)), ops.reshape(norms, lead)
