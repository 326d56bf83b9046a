"""The argument checks a whole-call attention kernel (``attend_step``: Triton on CUDA, C on CPU) shares."""

from __future__ import annotations

MAX_ROWS = 16  # query rows per KV head (G * Tq) the whole-call kernels take
MAX_DIM = 256  # head dims they take


def step_shape(q, dense, hist, length: int) -> tuple[int, int, int, int, int, int]:
    """(B, Hq, Tq, D, Hkv, G) of an ``attend_step`` call, after checking ``q`` (B, Hq, Tq, D), the three
    ``dense`` segments (sinks, window, own tokens: (k, v) pairs (B, Hkv, n, D) on q's device, or None)
    and that something is attended (``length`` history tokens of ``hist`` or a segment); one clear
    error naming the argument otherwise."""
    if getattr(q, "dim", lambda: 0)() != 4:
        raise ValueError(f"q must be (B, Hq, Tq, D), got shape {tuple(getattr(q, 'shape', ()))}")
    B, Hq, Tq, D = q.shape
    if len(dense) != 3:
        raise ValueError("dense must hold three (k, v) pairs or None: sinks, window, own tokens")
    held = [kv for kv in dense if kv is not None]
    like = held[0][0] if held else (hist[0] if length else None)
    if like is None:
        raise ValueError("nothing to attend: no history and no full-precision tokens")
    Hkv = like.shape[1]
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if G * Tq > MAX_ROWS or D > MAX_DIM:
        raise ValueError(f"attend_step takes G * Tq <= {MAX_ROWS} query rows and head_dim <= {MAX_DIM}, "
                         f"got {G * Tq} and {D}")
    for k, v in held:
        for x in (k, v):
            if x.dim() != 4 or tuple(x.shape[:2]) != (B, Hkv) or x.shape[3] != D or x.device != q.device:
                raise ValueError(f"dense tokens must be ({B}, {Hkv}, n, {D}) on {q.device}, "
                                 f"got {tuple(x.shape)} on {x.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v of a segment must hold the same tokens, got {k.shape[2]} and {v.shape[2]}")
    return B, Hq, Tq, D, Hkv, G
