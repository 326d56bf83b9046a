"""Real bit packing of b-bit codes (b = 1..8) as bit planes, written once against the ops shim.

A b-bit code is split into planes of 4, 2 and 1 bits (b=3 -> 2+1, b=5 -> 4+1, b=7 -> 4+2+1;
b=8 is one byte per code). A plane of width w packs 8/w codes per byte, lowest code in the lowest
bits, so every operation stays in uint8 (no code straddles a byte inside a plane) and the planes
are concatenated along the last axis: [w=4 plane | w=2 plane | w=1 plane]. A vector of n codes
takes ``ceil(n / 8) * b`` bytes: exactly ``n * b / 8`` when n is a multiple of 8 (every shipped
head dim is).
"""

from __future__ import annotations

from .config import check_bits
from .ops import for_array


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths for ``bits``, widest first, e.g. 7 -> (4, 2, 1)."""
    check_bits("bits", bits)
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    return -(-n // 8) * check_bits("bits", bits)


def pack(codes, bits: int):
    """Pack integer codes in [0, 2**bits) along the last axis.

    codes: (..., n) integer array -> (..., packed_size(n, bits)) uint8 array, same backend.
    """
    ops = for_array(codes)
    n = codes.shape[-1]
    lead = tuple(codes.shape[:-1])
    c = ops.astype(codes, ops.uint8)
    if n % 8:
        c = ops.pad_last(c, 8 - n % 8)
    out, shift = [], 0
    for w in planes(bits):
        p = c if shift == 0 else ops.shift_right(c, shift)
        if w < 8:
            p = ops.bit_and(p, (1 << w) - 1)
            per = 8 // w
            g = ops.reshape(p, lead + (-1, per))
            acc = g[..., 0]
            for i in range(1, per):
                acc = ops.bit_or(acc, ops.shift_left(g[..., i], w * i))
            p = acc
        out.append(p)
        shift += w
    return out[0] if len(out) == 1 else ops.concat(out, -1)


def unpack(packed, bits: int, n: int):
    """Inverse of :func:`pack`: (..., packed_size(n, bits)) uint8 -> (..., n) uint8 codes."""
    ops = for_array(packed)
    lead = tuple(packed.shape[:-1])
    m = -(-n // 8) * 8  # padded code count
    code, start, shift = None, 0, 0
    for w in planes(bits):
        size = m * w // 8
        p = packed[..., start:start + size]
        if w < 8:
            per = 8 // w
            shifts = ops.arange(per, ops.uint8, p) * w
            p = ops.reshape(ops.bit_and(ops.shift_right(p[..., None], shifts), (1 << w) - 1), lead + (m,))
        part = p if shift == 0 else ops.shift_left(p, shift)
        code = part if code is None else ops.bit_or(code, part)
        start += size
        shift += w
    return code[..., :n]
