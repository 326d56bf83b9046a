"""Fused kernels for TurboQuant caches, chosen per codec and device: attention over a compressed
history, and encoding (norm, rotation, codes, packing in one pass).

``history_attention(codec_k, codec_v, like)`` returns a function
``(q_space, hist_k, hist_v, length) -> (o_space, lse)`` that attends the rotated, scaled queries
``q_space`` (B, H, R, D) over the first ``length`` held tokens without decoding them, or ``None``
when no kernel applies (then ``View.attend`` uses the method's space in array ops, the portable
path). Kernels exist for TurboQuant codecs: Triton on CUDA (``kernels/triton``), C on CPU
(``kernels/cpu``). Each is held to the array-ops path and to the decoded reference by parity tests.
Which device gets which kernel is the ops shim's business (``ops.attention_kernel``).
"""

from __future__ import annotations

from ..ops import for_array

MAX_ROWS = 16  # query rows per KV head (GQA group x new tokens) the kernels take; more: array ops


def history_attention(codec_k, codec_v, like, dtype=None):
    """The fused kernel for this codec pair on ``like``'s device, or None. ``dtype``: the model's
    dtype; 16-bit queries take the kernels' fast lookup, float32 their exact one."""
    from ..methods.turboquant import TurboQuantCodec

    if not (isinstance(codec_k, TurboQuantCodec) and isinstance(codec_v, TurboQuantCodec)):
        return None
    if like.shape[-2] > MAX_ROWS:
        return None
    ops = for_array(like)
    kernel = ops.attention_kernel(like)
    if kernel is None:
        return None
    qk, qv = codec_k.q, codec_v.q
    f32 = ops.float32
    half = dtype if dtype is not None and ops.dtype_name(dtype) in ("float16", "bfloat16") else None
    tables = {}
    if half is not None and getattr(kernel, "byte_tables", None) is not None:
        tables = {"k_table": qk.derived("byte_tables", lambda c: kernel.byte_tables(c, qk.bits)),
                  "v_table": qv.derived("byte_tables", lambda c: kernel.byte_tables(c, qv.bits))}

    def run(q_space, hist_k: dict, hist_v: dict, length: int):
        q_in = q_space if half is None else ops.astype(q_space, half)
        o, lse = kernel.attend_codes(q_in, hist_k["codes"], hist_k["norms"], hist_v["codes"], hist_v["norms"],
                        qk.const("centroids", like, f32), qv.const("centroids", like, f32),
                        bits_k=qk.bits, bits_v=qv.bits, length=length, scale=1.0, **tables)
        return o, lse[..., None]

    return run


def encode(quantizer, x):
    """``(codes, norms)`` of ``x`` (..., D) from the fused encode kernel of ``x``'s device, or None
    when there is none (then ``TurboQuantizer.encode`` runs as array ops). Same codes as the array
    ops up to float32 rounding at a boundary (parity-tested)."""
    ops = for_array(x)
    module = ops.encode_kernel(x)
    if (module is None or quantizer.precision != "float32"
            or ops.dtype_name(x.dtype) not in ("float32", "float16", "bfloat16")):  # the kernel's inputs
        return None
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    rows = ops.reshape(x, (-1, d))
    codes = ops.empty((rows.shape[0], quantizer.code_bytes), ops.uint8, x)
    norms = ops.empty((rows.shape[0],), ops.float16, x)
    sym = quantizer.derived("symmetric", lambda c: module.symmetric(quantizer.codebook.boundaries, c, quantizer.bits))
    module.encode_into(rows, quantizer.const("rot_t", x, ops.float32), quantizer.const("boundaries", x, ops.float32),
                       quantizer.const("centroids", x, ops.float32), bits=quantizer.bits,
                       norm_correction=quantizer.norm_correction, codes_out=codes, norms_out=norms,
                       is_symmetric=sym)
    return ops.reshape(codes, lead + (quantizer.code_bytes,)), ops.reshape(norms, lead)
