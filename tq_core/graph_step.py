"""A compressed layer's decode step with its state on the device, so a CUDA graph can replay it.

A decode loop that captures its step once as a CUDA graph and replays it (as serving stacks do)
pays no host time per layer. The eager step (``LayerStore.update`` + ``View.attend``) cannot be
replayed: the window grows by concatenation, the history's length is a Python int in every
kernel's grid, and the slot of the token leaving the window is chosen on the host.
``StaticLayer`` takes a ``LayerStore`` in its steady state (sinks full, window full, at least one
token encoded) and holds the same state in fixed buffers:

* the window as a ring of ``window`` slots: with one query token every held token is visible, so
  attention does not depend on their order;
* the history in the store's own buffers, reserved for ``capacity`` tokens;
* a device clock t, a (1,) int64 tensor: the history holds ``base + t`` tokens and the ring's
  oldest token sits at slot ``t % window``. The kernels read t (their grid sized for the capacity;
  splits past the length run no tile: ``kernels/triton/decode_attention.py``);
* one step = attention over sinks, history, ring and the step's own token (one softmax, the
  whole-call kernels ``View.attend`` uses on CUDA), then the oldest ring token encoded into the
  history at ``base + t`` (the fused encode ``LayerStore`` uses, reading and writing at the clock's
  positions: ``kernels.spill_at``), the new token written into its slot (``kernels.ring_write``),
  and t moved on. Five launches per layer (the query's rotation, two for attention, two to store).
  Layers can share one clock (``clock=``): the caller then moves it on once per step, after the
  last layer (``clock.add_(1)``), else each layer moves its own.

``sync()`` writes the state back into the store (the window in order), so eager use resumes where
the replays left it. Tests hold static steps to eager ones: the same codes, the same outputs to
float rounding. Decode only (one query token per step); TurboQuant codecs on torch, through the
Triton whole-call kernels (CUDA; the interpreter on CPU in tests).
"""

from __future__ import annotations

from . import kernels
from .kvstore import LayerStore, centered


class StaticLayer:
    """The decode step of ``store`` (a full-attention ``LayerStore`` in its steady state) for up to
    ``capacity`` encoded history tokens, with every index on the device (see the module docstring).
    ``clock``: a (1,) int64 tensor on the store's device shared by layers (read once here); None:
    the layer keeps its own. ``overlap``: on CUDA, encode the token leaving the window on a side
    stream beside the attention (captured as a fork and join in a graph)."""

    def __init__(self, store: LayerStore, capacity: int, clock=None, overlap: bool = True):
        import torch

        if not isinstance(store, LayerStore):
            raise TypeError(f"store must be a LayerStore, got {type(store).__name__}")
        if store.span:
            raise ValueError("a sliding-window layer (span) has no static step; use the eager one")
        if store.simulate:
            raise ValueError("a store in simulated mode has no static step")
        n_win = 0 if store.win_k is None else store.win_k.shape[2]
        n_sink = 0 if store.sink_k is None else store.sink_k.shape[2]
        if store.window < 1 or n_win != store.window or n_sink != store.sinks or store.hist_k.held < 1:
            raise ValueError(f"store must be in its steady state for a static step: sinks {n_sink} of "
                             f"{store.sinks}, window {n_win} of {store.window} (at least 1), "
                             f"{store.hist_k.held} tokens encoded (at least 1)")
        if not isinstance(store.win_k, torch.Tensor):
            raise ValueError("a static step holds torch tensors")
        held = store.hist_k.held
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= held:
            raise ValueError(f"capacity must be an int > the {held} encoded tokens held, got {capacity!r}")
        like = store.win_k
        dev = like.device
        if clock is None:
            clock, self.own_clock = torch.zeros(1, dtype=torch.int64, device=dev), True
        else:
            if not isinstance(clock, torch.Tensor) or clock.dtype != torch.int64 or clock.numel() != 1 or clock.device != dev:
                raise ValueError(f"clock must be a (1,) int64 tensor on {dev}")
            self.own_clock = False
        self.store, self.capacity, self.clock = store, capacity, clock
        t0 = int(clock.item())
        self.base = held - t0  # the history holds base + t tokens
        for hist in (store.hist_k, store.hist_v):  # (a full-attention layer's history starts at slot 0)
            hist.reserve(like, capacity)
        w = store.window
        # the ring, (B, H, window, D): the oldest token at slot t0 % window
        self.ring_k = torch.roll(store.win_k, t0 % w, 2).contiguous()
        self.ring_v = torch.roll(store.win_v, t0 % w, 2).contiguous()
        self._synced = held
        self._fn = None
        self.overlap, self._stream = overlap, None

    def step(self, q, k, v, scale: float, out=None):
        """Attend ``q`` (B, Hq, 1, D) over what is held plus this step's ``k``, ``v`` (B, H, 1, D),
        then hold them: returns (B, Hq, 1, D) in ``q``'s dtype (into ``out`` when given). No host
        read, no allocation that depends on the length: a CUDA graph of it stays valid while the
        history grows (at most ``capacity`` tokens encoded: more writes past the buffers)."""
        import torch

        s = self.store
        if q.shape[2] != 1 or k.shape[2] != 1:
            raise ValueError(f"a static step takes one query and one new token, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        k = centered(k, s.center_k)  # as the store holds keys (CacheConfig.center), else k itself
        if self._fn is None:
            self._fn = s.attention_step(q, k.shape[1])
            if self._fn is None:
                raise ValueError("a static step needs the whole-call attention kernels (Triton on CUDA) "
                                 "for this codec, query shape and head_dim")
        sinks = None if s.sink_k is None else (s.sink_k, s.sink_v)
        hist_k, hist_v = s.hist_k.buffers, s.hist_v.buffers
        # The ring's oldest token leaves the window, encoded at the history's end: on a side stream
        # where there is one (CUDA), beside the attention, which reads neither the position it writes
        # (past the length) nor anything it changes; the ring write waits for both.
        side = self._side(q)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._spill(hist_k, hist_v)
        out = self._fn(q, (sinks, (self.ring_k, self.ring_v), (k, v)), hist_k, hist_v, self.capacity, scale,
                       length_dev=self.clock, length_base=self.base, out=out)
        if side is None:
            self._spill(hist_k, hist_v)
        else:
            torch.cuda.current_stream().wait_stream(side)
        # rounded to the ring's 16 bits by torch, as the eager store rounds its window (a no-op when
        # the model computes in that dtype)
        k, v = k.to(self.ring_k.dtype), v.to(self.ring_v.dtype)
        if not kernels.ring_write(k, v, self.ring_k, self.ring_v, self.clock):
            slot = torch.remainder(self.clock, self.ring_k.shape[2])
            self.ring_k.index_copy_(2, slot, k)
            self.ring_v.index_copy_(2, slot, v)
        if self.own_clock:
            self.clock.add_(1)
        return out

    def _side(self, q):
        """The side stream the spill runs on (CUDA, ``overlap``), made once; None: run in order."""
        if not self.overlap or not getattr(q, "is_cuda", False):
            return None
        if self._stream is None:
            import torch

            self._stream = torch.cuda.Stream(device=q.device)
        return self._stream

    def _spill(self, hist_k: dict, hist_v: dict) -> None:
        """Encode the ring's oldest token into the history at ``base + t`` (fused where the device has
        it, else torch's indexed ops)."""
        import torch

        s = self.store
        if kernels.spill_at(s.codec_k, s.codec_v, self.ring_k, self.ring_v, hist_k, hist_v, self.clock, self.base):
            return
        slot = torch.remainder(self.clock, self.ring_k.shape[2])
        pos = self.clock + self.base
        for codec, ring, buffers in ((s.codec_k, self.ring_k, hist_k), (s.codec_v, self.ring_v, hist_v)):
            for name, value in codec.encode(ring.index_select(2, slot)).items():
                buffers[name].index_copy_(2, pos, value)

    def sync(self) -> None:
        """Write the state back into the store (one host read): its history length, its window in
        order, its token count; eager ``update`` calls continue from there (a StaticLayer made
        afterwards continues the replays)."""
        import torch

        s = self.store
        t = int(self.clock.item())
        n = self.base + t
        slot = t % self.ring_k.shape[2]
        for hist in (s.hist_k, s.hist_v):
            hist.n = n
        s.win_k = torch.cat([self.ring_k[:, :, slot:], self.ring_k[:, :, :slot]], 2)
        s.win_v = torch.cat([self.ring_v[:, :, slot:], self.ring_v[:, :, :slot]], 2)
        s.length += n - self._synced
        self._synced = n
