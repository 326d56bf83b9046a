"""One layer of a compressed KV cache, shared by the transformers and mlx-lm integrations.

Layout of what a layer holds, along the token axis (arrays are ``(batch, kv_heads, tokens, head_dim)``):

    [ sinks: full precision | history: packed codes + fp16 norms | window: full precision ]

New tokens go to the sinks until ``sinks`` positions are held, then into the window; tokens that
leave the window are encoded once and appended to the history, which is never re-encoded.

``update(k, v)`` returns what attention reads: sinks, decoded history and window from earlier
calls, followed by this call's own tokens in full precision. So a chunk of new tokens attends to
itself in full precision and to everything before it as stored; with one token per call this is
exactly generation (decode semantics).
"""

from __future__ import annotations

from dataclasses import replace

from .config import CacheConfig
from .ops import for_array
from .quantizer import Encoded, TurboQuantizer
from .rotation import derive_seed


class LayerStore:
    """Compressed K/V storage of one attention layer.

    Args:
        config: bits, sinks, window, seed and norm correction.
        layer: layer index (selects the rotation seeds, see ``rotation.derive_seed``).
        head_dim: K/V vector length.
        simulate: return every token as stored, this call's included ("simulated" scoring mode).
    """

    def __init__(self, config: CacheConfig, layer: int, head_dim: int, simulate: bool = False):
        self.config = config
        self.simulate = simulate
        self.qk = TurboQuantizer(head_dim, config.bits_k, derive_seed(config.seed, layer, "k"),
                                 norm_correction=config.norm_correction)
        self.qv = TurboQuantizer(head_dim, config.bits_v, derive_seed(config.seed, layer, "v"),
                                 norm_correction=config.norm_correction)
        self.length = 0
        self.sink_k = self.sink_v = None  # (B, H, <=sinks, D)
        self.win_k = self.win_v = None  # (B, H, <=window, D)
        self.hist_k: Encoded | None = None  # codes (B, H, n, bytes), norms (B, H, n)
        self.hist_v: Encoded | None = None

    # ---- what attention reads ---------------------------------------------------------------
    def update(self, k, v):
        """Store new tokens and return (keys, values) for attention, each (B, H, length, D).

        With ``simulate`` set, this call's own tokens are returned as stored too (quantized
        unless they are sinks or in the window): every K/V is quantized before attention.
        """
        ops = for_array(k)
        if self.simulate:
            self._store(k, v, ops)
            return self._held(ops, k.dtype, v.dtype)
        keys, values = self._held(ops, k.dtype, v.dtype, (k, v))
        self._store(k, v, ops)
        return keys, values

    def _held(self, ops, k_dtype, v_dtype, new=None):
        parts_k, parts_v = [], []
        if self.sink_k is not None:
            parts_k.append(self.sink_k)
            parts_v.append(self.sink_v)
        if self.hist_k is not None:
            parts_k.append(self.qk.decode(self.hist_k, dtype=k_dtype))
            parts_v.append(self.qv.decode(self.hist_v, dtype=v_dtype))
        if self.win_k is not None:
            parts_k.append(self.win_k)
            parts_v.append(self.win_v)
        if new is not None:
            parts_k.append(new[0])
            parts_v.append(new[1])
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        return ops.concat(parts_k, 2), ops.concat(parts_v, 2)

    # ---- how tokens are stored -------------------------------------------------------------
    def _store(self, k, v, ops):
        n = k.shape[2]
        self.length += n
        held = 0 if self.sink_k is None else self.sink_k.shape[2]
        take = min(self.config.sinks - held, n)
        if take > 0:
            self.sink_k = _append(ops, self.sink_k, k[:, :, :take])
            self.sink_v = _append(ops, self.sink_v, v[:, :, :take])
            k, v = k[:, :, take:], v[:, :, take:]
            if k.shape[2] == 0:
                return
        win_k = _append(ops, self.win_k, k)
        win_v = _append(ops, self.win_v, v)
        spill = win_k.shape[2] - self.config.window
        if spill > 0:
            # No host sync per layer per step: NaN/Inf K/V propagate to the output (see encode).
            self.hist_k = self._append_encoded(ops, self.hist_k, self.qk.encode(win_k[:, :, :spill], check=False))
            self.hist_v = self._append_encoded(ops, self.hist_v, self.qv.encode(win_v[:, :, :spill], check=False))
            win_k, win_v = win_k[:, :, spill:], win_v[:, :, spill:]
        if win_k.shape[2] == 0:
            win_k = win_v = None
        self.win_k, self.win_v = win_k, win_v

    @staticmethod
    def _append_encoded(ops, old: Encoded | None, new: Encoded) -> Encoded:
        if old is None:
            return new
        return replace(new, codes=ops.concat([old.codes, new.codes], 2),
                       norms=ops.concat([old.norms, new.norms], 2))

    # ---- accounting ------------------------------------------------------------------------
    def nbytes(self) -> dict:
        """Bytes held, by part, counted from every array this store holds (nothing is listed by hand):
        codes + norms of the history, full-precision sinks and window, and ``other`` (any other
        array attribute, so a stray copy cannot hide from the count)."""
        parts = {"codes": 0, "norms": 0, "sinks": 0, "window": 0, "other": 0}
        for name, value in vars(self).items():
            if isinstance(value, Encoded):
                parts["codes"] += _nbytes(value.codes)
                parts["norms"] += _nbytes(value.norms)
            elif _is_array(value):
                parts[_PART.get(name, "other")] += _nbytes(value)
        return parts

    @property
    def encoded_tokens(self) -> int:
        return 0 if self.hist_k is None else self.hist_k.norms.shape[2]

    def select_batch(self, idx) -> None:
        """Keep batch rows ``idx`` (beam search reordering); codes are moved, never re-encoded."""
        for name in ("sink_k", "sink_v", "win_k", "win_v"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, for_array(x).select_batch(x, idx))
        for name in ("hist_k", "hist_v"):
            e = getattr(self, name)
            if e is not None:
                ops = for_array(e.codes)
                setattr(self, name, replace(e, codes=ops.select_batch(e.codes, idx),
                                            norms=ops.select_batch(e.norms, idx)))


_PART = {"sink_k": "sinks", "sink_v": "sinks", "win_k": "window", "win_v": "window"}


def _is_array(value) -> bool:
    try:
        for_array(value)
    except TypeError:
        return False
    return True


def _nbytes(x) -> int:
    return for_array(x).nbytes(x)


def _append(ops, old, new):
    return new if old is None else ops.concat([old, new], 2)
