"""One layer of a compressed KV cache, shared by the transformers and mlx-lm integrations.

Layout of what a layer holds, along the token axis (arrays are ``(batch, kv_heads, tokens, head_dim)``):

    [ sinks: full precision | history: the method's encoded fields | window: full precision ]

"Full precision" is 16 bits: the model's dtype when it is 16-bit, else bfloat16 (a float32 model's
sinks and window would otherwise cost twice the bytes for no measurable gain).

New tokens go to the sinks until ``sinks`` positions are held, then into the window; tokens that
leave the window are encoded once by the config's method (``tq_core.methods``) and appended to the
history, which is never re-encoded. With ``CacheConfig.center`` (TurboQuant), every key is held
minus a per-head mean, ``center_k`` (B, H, 1, D), fixed when tokens first leave the window: the mean
of the first ``window + 1`` positions after the sinks (the same tokens whatever the call sizes). A key
offset shared by all tokens (a k_proj bias) is most of some layers' key energy and adds the same
logit to every position, so attention is unchanged by removing it, while the codes' error
(proportional to what they encode) shrinks to the part that varies. Values are not centered: on
SmolLM2-135M (K4V2+s4w128, 1 024 tokens, decode semantics, torch-cpu) centering keys and values (as
commit 1c0c9d1 did) took KLD from 0.0088 to 0.0125, keys alone to 0.0075
(reports/results/cpu/20261201T111208_5f9a803a54.json). The history lives in preallocated buffers per field,
``(batch, kv_heads, capacity, *field shape)``, that grow by blocks (amortized O(1) per token, no
per-token concatenation); ``reserve(tokens)`` sizes them up front.

A sliding-window layer (``span``: each query reads itself and the ``span - 1`` positions before it)
holds at most its last ``span - 1`` positions: the sinks while they are among them, then the
oldest history; tokens that would leave it at once are never encoded, and the history's buffers
are compacted when they fill, so bytes stay bounded like the host library's own sliding cache.

``update(k, v)`` stores new tokens and returns a ``View``: the cache as it stood before the call
plus this call's own tokens in full precision. ``View.dense()`` is the reference path (history
decoded into the original space, what a host library's own attention reads); ``View.attend(q)``
attends without decoding the history back (the method's space: TurboQuant's rotated one), with one
softmax over sinks, history, window and the call's own tokens (causal among them). So a chunk of
new tokens attends to itself in full precision and to everything before it as stored; with one
token per call this is exactly generation (decode semantics).
"""

from __future__ import annotations

from . import kernels, methods
from .config import CacheConfig, check_count
from .ops import for_array

ATTENTION_MODES = ("auto", "ops", "reference")
BLOCK = 256  # history buffers grow in multiples of this many tokens ...
GROWTH = 16  # ... and by at least 1/GROWTH of their capacity: amortized O(1), <= 6.25 % spare


def _blocks(tokens: int) -> int:
    """``tokens`` rounded up to whole blocks."""
    return -(-tokens // BLOCK) * BLOCK


class History:
    """The encoded tokens of one kind (K or V): the codec's fields in preallocated buffers."""

    def __init__(self, codec):
        self.codec = codec
        self.buffers: dict | None = None  # field -> (B, H, capacity, *trailing); [start, n) are held
        self.start = 0  # tokens dropped from the front (a sliding-window layer), not yet compacted away
        self.n = 0

    @property
    def held(self) -> int:
        """Encoded tokens held."""
        return self.n - self.start

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else next(iter(self.buffers.values())).shape[2]

    def slots(self, x) -> dict:
        """Views of the buffers where ``x``'s (B, H, t, D) encoded tokens go next (grown if needed);
        ``n`` moves on only when they are written (``write``, or a caller's fused encode and ``n += t``)."""
        t = x.shape[2]
        if self.n + t > self.capacity:
            self._grow(x, self.held + t)
        return {name: buf[:, :, self.n:self.n + t] for name, buf in self.buffers.items()}

    def write(self, x, views: dict | None = None) -> None:
        """Encode ``x`` (B, H, t, D) and hold it after the tokens held: the codec writes into the
        buffers where it can (``Codec.encode_into``: a fused kernel), else its fields are copied in."""
        t = x.shape[2]
        views = self.slots(x) if views is None else views
        if not self.codec.encode_into(x, views):
            for name, value in self.codec.encode(x).items():
                self.buffers[name][:, :, self.n:self.n + t] = value  # (an MLX slice is a copy: write the buffer)
        self.n += t

    def reserve(self, like, tokens: int) -> None:
        """Room for ``tokens`` encoded tokens in all (exactly: no spare when the count is known)."""
        if tokens > self.capacity:
            self._grow(like, tokens, exact=True)

    def drop(self, t: int) -> None:
        """Stop holding the ``t`` oldest encoded tokens (a sliding-window layer's span moved on);
        their slots are reclaimed when the buffers are next compacted."""
        self.start += max(0, min(t, self.held))

    def _grow(self, like, need: int, exact: bool = False) -> None:
        """Buffers for ``need`` tokens, the held ones copied to their front. After drops (a sliding
        layer) they keep their capacity when it leaves a block spare, so compaction copies the held
        tokens at most once per block of new ones."""
        ops = for_array(like)
        if exact:
            cap = need
        elif self.start:
            cap = max(self.capacity, need + BLOCK)
        else:
            cap = _blocks(max(need, self.capacity + self.capacity // GROWTH))
        b, h, held = like.shape[0], like.shape[1], self.held
        new = {}
        for name, (trailing, dtype) in self.codec.fields().items():
            buf = ops.empty((b, h, cap) + tuple(trailing), getattr(ops, dtype), like)
            if self.buffers is not None and held:
                buf[:, :, :held] = self.buffers[name][:, :, self.start:self.n]
            new[name] = buf
        self.buffers, self.start, self.n = new, 0, held

    def parts(self) -> dict:
        """Views of the held tokens of every field, (B, H, held, *trailing)."""
        return {name: buf[:, :, self.start:self.n] for name, buf in (self.buffers or {}).items()}

    def nbytes(self) -> dict:
        """Bytes of each field's held tokens, and ``spare``: capacity allocated beyond them."""
        out, spare = {name: 0 for name in self.codec.fields()}, 0
        for name, buf in (self.buffers or {}).items():
            ops = for_array(buf)
            total = ops.nbytes(buf)
            used = total * self.held // buf.shape[2]
            out[name] = used
            spare += total - used
        out["spare"] = spare
        return out

    def select_batch(self, idx) -> None:
        if self.buffers is not None:
            self.buffers = {n: for_array(b).select_batch(b, idx) for n, b in self.buffers.items()}


class LayerStore:
    """Compressed K/V storage of one attention layer.

    Args:
        config: method, bits, sinks, window, seed and the method's options.
        layer: layer index (selects the rotation seeds, see ``rotation.derive_seed``).
        head_dim: K vector length; ``head_dim_v``: V vector length (default: ``head_dim``).
        simulate: return every token as stored, this call's included ("simulated" scoring mode).
        lead: positions held in full precision before the sinks, for a left-padded batch whose
            rows start with up to ``lead`` padding positions: the sink region is then the first
            ``lead + sinks`` positions, so every row's first ``sinks`` real tokens are sinks (rows
            with less padding hold a few more real tokens in full precision). Applies only when
            the config has sinks; 0 for an unpadded batch.
        attention: how ``View.attend`` reads the history: "auto" (a fused kernel for the device when
            one exists, else array ops in the method's space), "ops" (array ops only), or
            "reference" (the integrations hand attention the decoded history, ``View.dense``).
        span: 0 for a full-attention layer; for a sliding-window layer, the positions each query
            reads (itself and the ``span - 1`` before it, the host library's ``sliding_window``).
            Such a layer holds at most its last ``span - 1`` positions: the sinks until they leave
            them, ``min(window, span - 1)`` in the window, the rest encoded.
    """

    def __init__(self, config: CacheConfig, layer: int, head_dim: int, simulate: bool = False,
                 head_dim_v: int | None = None, attention: str = "auto", lead: int = 0, span: int = 0):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.config = config
        check_count("lead", lead)
        if check_count("span", span) == 1:
            raise ValueError("span must be 0 (full attention) or a sliding window of at least 2 positions, got 1")
        self.span = span
        self.window = min(config.window, span - 1) if span else config.window
        self.lead = lead if config.sinks else 0  # no sinks: padding is held like any other token
        self.simulate = simulate
        self.attention = attention
        method = methods.get(config.method)
        self.codec_k = method.codec(config, layer, "k", head_dim)
        self.codec_v = method.codec(config, layer, "v", head_dim_v or head_dim)
        self.length = 0
        self.sink_k = self.sink_v = None  # (B, H, <=sinks, D)
        self.win_k = self.win_v = None  # (B, H, <=window, D)
        self.hist_k = History(self.codec_k)
        self.hist_v = History(self.codec_v)
        self.center = config.centers_keys
        self.center_k = None  # (B, H, 1, D) float32, once set (see the module docstring)
        self._steps: dict = {}  # (q shape, dtype, device, kv heads) -> the fused whole-call function or None

    # ---- what attention reads ---------------------------------------------------------------
    def update(self, k, v) -> "View":
        """Store new tokens ``k``, ``v`` (B, H, T, D); return what attention reads (see ``View``).

        With ``simulate`` set, this call's own tokens are returned as stored too (quantized
        unless they are sinks or in the window): every K/V is quantized before attention.
        """
        self._check(k, v)
        if self.simulate:
            self._store(k, v)
            return self.snapshot()
        view = self.snapshot(new=(k, v))
        self._store(k, v)
        return view

    def _check(self, k, v) -> None:
        """Shapes only (no device read): what a host library hands a layer, checked before it is held."""
        dims = (self.codec_k.dim, self.codec_v.dim)
        for name, x, d in (("k", k, dims[0]), ("v", v, dims[1])):
            if getattr(x, "ndim", None) != 4 or x.shape[-1] != d:
                raise ValueError(f"{name} must be (batch, kv_heads, tokens, {d}) for this layer, got "
                                 f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if tuple(k.shape[:3]) != tuple(v.shape[:3]):
            raise ValueError(f"k and v must hold the same tokens: (batch, kv_heads, tokens) {tuple(k.shape[:3])} "
                             f"vs {tuple(v.shape[:3])}")
        held = self._held_shape()
        if self.length and tuple(k.shape[:2]) != held:
            raise ValueError(f"k must have the (batch, kv_heads) {held} of the tokens held, got {tuple(k.shape[:2])} "
                             f"(reorder or select rows with select_batch)")

    def snapshot(self, new=None) -> "View":
        """The layer as it stands now (plus ``new`` tokens in full precision). Later stores never
        change it: buffers are written past its length only, and grown by copying."""
        return View(self, self.sink_k, self.sink_v, self.hist_k.parts(), self.hist_v.parts(),
                    self.win_k, self.win_v, new)

    def reserve(self, k_like, tokens: int) -> None:
        """Preallocate the history for a cache that will hold ``tokens`` tokens in all."""
        if self.span:
            tokens = min(tokens, self.span - 1) + BLOCK  # and a block to drop and compact by
        enc = max(0, tokens - self.sinks - self.window)
        if enc:
            self.hist_k.reserve(k_like, enc)
            self.hist_v.reserve(k_like, enc)

    # ---- how tokens are stored -------------------------------------------------------------
    def _store(self, k, v):
        ops = for_array(k)
        n = k.shape[2]
        self.length += n
        dtype_k, dtype_v = k.dtype, v.dtype
        take = min(max(0, self.sinks - (self.length - n)), n)  # positions < sinks are sinks
        if self.center and self.center_k is None:
            self._set_center(ops, k[:, :, take:])
        if self.center_k is not None:  # in float32, before the 16-bit rounding of sinks and window
            k = ops.astype(k, ops.float32) - self.center_k
        # Sinks and window are held in 16 bits whatever the model computes in (its own dtype when
        # that is 16-bit, else bfloat16): a float32 model would otherwise pay double for them.
        k, v = ops.astype(k, ops.residual_dtype(dtype_k)), ops.astype(v, ops.residual_dtype(dtype_v))
        if take > 0:
            self.sink_k = _append(ops, self.sink_k, k[:, :, :take])
            self.sink_v = _append(ops, self.sink_v, v[:, :, :take])
            k, v = k[:, :, take:], v[:, :, take:]
        if k.shape[2]:
            self._window(ops, k, v)
        if self.span:
            self._trim()

    def _set_center(self, ops, k) -> None:
        """Fix ``center_k`` when this call's keys after the sinks, ``k`` (B, H, t, D), make the first
        tokens leave the window: the mean of the first ``window + 1`` positions after the sinks (the
        window's and these), so every chunking gives the same center. The sinks and window already
        held are re-held centered."""
        n_win = 0 if self.win_k is None else self.win_k.shape[2]
        if n_win + k.shape[2] <= self.window:
            return
        # from 16-bit values, as the window holds them: the same center whatever the call sizes
        x = ops.astype(ops.astype(k[:, :, :self.window + 1 - n_win], ops.residual_dtype(k.dtype)), ops.float32)
        if self.win_k is not None:
            x = ops.concat([ops.astype(self.win_k, ops.float32), x], 2)
        self.center_k = ops.reshape(ops.sum_last(ops.swap_last2(x)), x.shape[:2] + (1, x.shape[3])) / x.shape[2]
        for name in ("sink_k", "win_k"):
            held = getattr(self, name)
            if held is not None:  # a new array: views made before this call keep the old one
                setattr(self, name, ops.astype(ops.astype(held, ops.float32) - self.center_k, held.dtype))

    def _window(self, ops, k, v) -> None:
        """Append to the window; encode what leaves it into the history (for a sliding-window layer,
        only what its span still reads: the newest positions are the last to leave it)."""
        win_k = _append(ops, self.win_k, k)
        win_v = _append(ops, self.win_v, v)
        spill = win_k.shape[2] - self.window
        if spill > 0:
            old_k, old_v = win_k[:, :, :spill], win_v[:, :, :spill]
            if self.span:
                room = self.span - 1 - self.window
                old_k, old_v = old_k[:, :, spill - min(spill, room):], old_v[:, :, spill - min(spill, room):]
                # make room first, so the history's buffers compact instead of growing
                n_win = 0 if self.win_k is None else self.win_k.shape[2]
                self._trim(pending=old_k.shape[2] + self.window - n_win)
            if old_k.shape[2]:
                self._hold(old_k, old_v)
            win_k, win_v = win_k[:, :, spill:], win_v[:, :, spill:]
        if win_k.shape[2] == 0:
            win_k = win_v = None
        self.win_k, self.win_v = win_k, win_v

    def _trim(self, pending: int = 0) -> None:
        """A sliding-window layer keeps its last ``span - 1`` positions: drop the oldest beyond them
        (with ``pending`` more about to be held), sinks first, then the history's front (the window
        never exceeds them)."""
        excess = self.held + pending - (self.span - 1)
        if excess <= 0:
            return
        n_sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        drop = min(excess, n_sink)
        if drop:
            keep = n_sink - drop
            self.sink_k, self.sink_v = ((self.sink_k[:, :, drop:], self.sink_v[:, :, drop:]) if keep else (None, None))
        for hist in (self.hist_k, self.hist_v):
            hist.drop(excess - drop)

    def _hold(self, k, v) -> None:
        """Encode tokens leaving the window into the history: keys and values in one fused launch
        where the codecs and device have one (``kernels.encode_pair_into``), else each on its own."""
        slots_k, slots_v = self.hist_k.slots(k), self.hist_v.slots(v)
        if kernels.encode_pair_into(self.codec_k, self.codec_v, k, v, slots_k, slots_v):
            self.hist_k.n += k.shape[2]
            self.hist_v.n += v.shape[2]
        else:
            self.hist_k.write(k, slots_k)
            self.hist_v.write(v, slots_v)

    def __getstate__(self):
        # The fused-call functions hold the constants they were made with: a copy makes its own.
        return {**vars(self), "_steps": {}}

    def attention_step(self, q, kv_heads: int):
        """``kernels.attention_step`` for queries like ``q``, made once per (shape, dtype, device):
        a decode loop calls it every step of every layer."""
        key = (tuple(q.shape), str(q.dtype), str(getattr(q, "device", "")), kv_heads)
        if key not in self._steps:
            self._steps[key] = kernels.attention_step(self.codec_k, self.codec_v, q, kv_heads)
        return self._steps[key]

    @property
    def sinks(self) -> int:
        """Positions the sink region holds once full: the config's sinks after ``lead`` padding
        (a sliding-window layer drops them once they leave its span)."""
        return self.config.sinks + self.lead

    @property
    def held(self) -> int:
        """Positions held: every one stored, or for a sliding-window layer the last ``span - 1``."""
        return ((0 if self.sink_k is None else self.sink_k.shape[2]) + self.hist_k.held
                + (0 if self.win_k is None else self.win_k.shape[2]))

    # ---- accounting ------------------------------------------------------------------------
    def nbytes(self) -> dict:
        """Bytes held, by part, counted from every array this store holds (nothing is listed by hand):
        the method's fields of the history (e.g. ``codes``, ``norms``), ``spare`` history capacity,
        full-precision ``sinks`` and ``window``, and ``other`` (any other array attribute, so a stray
        copy cannot hide from the count)."""
        parts = {"sinks": 0, "window": 0, "other": 0}
        for name, value in vars(self).items():
            if isinstance(value, History):
                for part, n in value.nbytes().items():
                    parts[part] = parts.get(part, 0) + n
            elif _is_array(value):
                part = _PART.get(name, "other")
                parts[part] = parts.get(part, 0) + for_array(value).nbytes(value)
        return parts

    @property
    def encoded_tokens(self) -> int:
        return self.hist_k.held

    def _held_shape(self) -> tuple:
        """(batch, kv_heads) of what the store holds, (0, 0) while empty."""
        for x in (self.sink_k, self.win_k, *(self.hist_k.buffers or {}).values()):
            if x is not None:
                return int(x.shape[0]), int(x.shape[1])
        return 0, 0

    @property
    def batch_size(self) -> int:
        return self._held_shape()[0]

    @property
    def kv_heads(self) -> int:
        return self._held_shape()[1]

    def select_batch(self, idx) -> None:
        """Keep batch rows ``idx`` (beam search reordering); codes are moved, never re-encoded."""
        for name in ("sink_k", "sink_v", "win_k", "win_v", "center_k"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, for_array(x).select_batch(x, idx))
        self.hist_k.select_batch(idx)
        self.hist_v.select_batch(idx)


class View:
    """What one attention call reads: sinks, history, window as they were stored before the call,
    and the call's own tokens ``new`` (full precision; None in simulated mode)."""

    def __init__(self, store, sink_k, sink_v, hist_k: dict, hist_v: dict, win_k, win_v, new):
        self.store = store
        self.sink_k, self.sink_v, self.win_k, self.win_v = sink_k, sink_v, win_k, win_v
        self.hist_k, self.hist_v = hist_k, hist_v
        self.new = new
        # What every key held had subtracted (None: nothing); the call's own keys are not centered.
        self.center_k = store.center_k

    @property
    def history(self) -> int:
        return next(iter(self.hist_k.values())).shape[2] if self.hist_k else 0

    def dense(self, k_dtype, v_dtype):
        """(keys, values) in the original space, (B, H, tokens, D): the history decoded (reference path)."""
        parts_k, parts_v = [], []
        new_k, new_v = (None, None) if self.new is None else self.new
        for out, sink, codec, hist, win, new, dtype in (
                (parts_k, self.sink_k, self.store.codec_k, self.hist_k, self.win_k, new_k, k_dtype),
                (parts_v, self.sink_v, self.store.codec_v, self.hist_v, self.win_v, new_v, v_dtype)):
            center = self.center_k if out is parts_k else None
            for x in (sink, codec.decode(hist, dtype) if self.history else None, win, new):
                if x is not None:
                    ops = for_array(x)
                    if center is not None and x is not new:
                        x = ops.astype(x, ops.float32) + center
                    out.append(ops.astype(x, dtype))
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        ops = for_array(parts_k[0])
        return ops.concat(parts_k, 2), ops.concat(parts_v, 2)

    def attend(self, q, scale: float, mask=None, kernel: bool | None = None):
        """Attention of ``q`` (B, Hq, Tq, D) over what this view holds, in the method's space.

        One softmax over sinks, history, window and the call's own tokens, computed in two parts
        merged by their log-sum-exp: the history (through a fused kernel for the codec and device
        when one exists and ``kernel`` is set, else the method's space in array ops) and the
        full-precision tokens (``kernel=None``: as the store's ``attention`` mode says). Where the
        device has a kernel for the whole call (``kernels.attention_step``) and no ``mask`` is given,
        that runs instead: the same softmax in two launches. ``mask`` (B or 1, 1 or Hq, Tq, tokens) over the key positions in order
        (True / 0.0 = attend), as a host library builds it; without one, query row ``t`` reads new
        token ``i`` only when ``i <= t + (new - Tq)`` (causal, the queries being the last new tokens).
        Query head ``h`` reads KV head ``h // (Hq / H)`` (GQA): each KV head's history is read once for
        all its query heads. Scores and softmax in float32; returns (B, Hq, Tq, D) in ``q``'s dtype.
        """
        ops = for_array(q)
        b, hq, tq, d = q.shape
        kv_like = self.new[0] if self.new is not None else next(
            x for x in (self.sink_k, self.win_k, *self.hist_k.values()) if x is not None)
        h = kv_like.shape[1]
        g = hq // h
        use_kernel = (self.store.attention == "auto") if kernel is None else kernel
        new = self.new if self.new is None else (centered(self.new[0], self.center_k), self.new[1])
        if use_kernel and mask is None:
            # The whole call in the device's fused kernels, where it has them (Triton on CUDA, C on CPU).
            step = self.store.attention_step(q, h)
            if step is not None:
                dense = tuple(None if kv[0] is None else kv for kv in (
                    (self.sink_k, self.sink_v), (self.win_k, self.win_v), new or (None, None)))
                return step(q, dense, self.hist_k, self.hist_v, self.history, scale)
        q32 = ops.reshape(ops.astype(q, ops.float32), (b, h, g * tq, d)) * scale

        # Key positions: sinks [0, S) | history [S, S + n) | window | this call's own tokens.
        n_sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        n_win = 0 if self.win_k is None else self.win_k.shape[2]
        new_start = n_sink + self.history + n_win
        full = [(ops.astype(k, ops.float32), ops.astype(v, ops.float32), start) for k, v, start in (
            (self.sink_k, self.sink_v, 0), (self.win_k, self.win_v, n_sink + self.history),
            (None, None, 0) if new is None else (*new, new_start)) if k is not None]

        def masked(s, start: int):
            n = s.shape[-1]
            s5 = ops.reshape(s, (b, h, g, tq, n))
            if mask is not None:
                mh = mask.shape[1]
                m = ops.reshape(mask[..., start:start + n], (mask.shape[0], 1 if mh == 1 else h, 1 if mh == 1 else g, tq, n))
                s5 = ops.where(m, s5, -float("inf")) if ops.is_bool(m) else s5 + ops.astype(m, ops.float32)
            elif self.new is not None and start == new_start:
                row = ops.reshape(ops.arange(tq, ops.int64, q), (1, 1, 1, tq, 1))
                col = ops.reshape(ops.arange(n, ops.int64, q), (1, 1, 1, 1, n))
                s5 = ops.where(col <= row + (n - tq), s5, -float("inf"))
            return ops.reshape(s5, (b, h, g * tq, n))

        parts = []  # (output (B, H, G*Tq, D) normalized, log-sum-exp (B, H, G*Tq, 1))
        if full:
            scores = [masked(ops.matmul(q32, ops.swap_last2(k)), start) for k, _, start in full]
            parts.append(_softmax_parts(ops, scores, [v for _, v, _ in full]))
        if self.history:
            parts.append(self._history(ops, q32, use_kernel and mask is None, masked, q.dtype))
        if len(parts) == 1:
            out = parts[0][0]
        else:
            (o1, l1), (o2, l2) = parts
            top = ops.maximum2(l1, l2)
            top = ops.where(top > -float("inf"), top, 0.0)
            w1, w2 = ops.exp(l1 - top), ops.exp(l2 - top)
            out = (o1 * w1 + o2 * w2) / ops.where(w1 + w2 > 0, w1 + w2, 1.0)
        return ops.astype(ops.reshape(out, (b, hq, tq, d)), q.dtype)

    def _history(self, ops, q32, use_kernel: bool, masked, dtype):
        """(output, log-sum-exp) of the scaled queries ``q32`` (B, H, R, D) over the history alone."""
        ck, cv = self.store.codec_k, self.store.codec_v
        qk = ck.query(q32)
        fused = kernels.history_attention(ck, cv, qk, dtype) if use_kernel else None
        if fused is not None:
            o_space, lse = fused(qk, self.hist_k, self.hist_v, self.history)
            return cv.output(o_space), lse
        n_sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        s = masked(ops.matmul(qk, ops.swap_last2(ck.values_space(self.hist_k, ops.float32))), n_sink)
        o_space, lse = _softmax_parts(ops, [s], [cv.values_space(self.hist_v, ops.float32)])
        return cv.output(o_space), lse


def centered(k, center):
    """Keys ``k`` (B, H, t, D) as a centered store holds them: minus ``center`` (B, H, 1, D, float32),
    in float32 and back to ``k``'s dtype; ``k`` itself when there is no center."""
    if center is None:
        return k
    ops = for_array(k)
    return ops.astype(ops.astype(k, ops.float32) - center, k.dtype)


def _softmax_parts(ops, scores: list, values: list):
    """(softmax over all ``scores`` (..., R, n_i) jointly, applied to ``values`` (..., n_i, D): the
    normalized output (..., R, D), and the log-sum-exp (..., R, 1)). Rows with nothing to attend
    (all -inf) give 0 and -inf."""
    m = ops.amax_last(scores[0])
    for s in scores[1:]:
        m = ops.maximum2(m, ops.amax_last(s))
    m = ops.where(m > -float("inf"), m, 0.0)
    den = acc = None
    for s, v in zip(scores, values):
        p = ops.exp(s - m)
        d, a = ops.sum_last(p)[..., None], ops.matmul(p, v)
        den, acc = (d, a) if den is None else (den + d, acc + a)
    out = acc / ops.where(den > 0, den, 1.0)
    lse = ops.where(den > 0, m + ops.log(ops.where(den > 0, den, 1.0)), -float("inf"))
    return out, lse


_PART = {"sink_k": "sinks", "sink_v": "sinks", "win_k": "window", "win_v": "window",
         "center_k": "centers"}


def _is_array(value) -> bool:
    try:
        for_array(value)
    except TypeError:
        return False
    return True


def _append(ops, old, new):
    return new if old is None else ops.concat([old, new], 2)
