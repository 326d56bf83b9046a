"""A compressed layer's decode step with its state on the device, so a CUDA graph can replay it.

A decode loop that captures its step once as a CUDA graph and replays it (as serving stacks do)
pays no host time per layer. The eager step (``LayerStore.update`` + ``View.attend``) cannot be
replayed: the window grows by concatenation, the history's length is a Python int in every
kernel's grid, and the slot of the token leaving the window is chosen on the host.
``StaticLayer`` takes a ``LayerStore`` in its steady state (sinks full, window full, at least one
token encoded) and holds the same state in fixed buffers:

* the window as a ring of ``window`` slots: with one query token every held token is visible, so
  attention does not depend on their order;
* the history in the store's own buffers, reserved for ``capacity`` tokens; its length a (1,)
  int64 device tensor that the kernels read (their grid sized for the capacity; splits past the
  length run no tile: ``kernels/triton/decode_attention.py``);
* one step = attention over sinks, history, ring and the step's own token (one softmax, the
  whole-call kernels ``View.attend`` uses on CUDA), then the ring's oldest token is encoded into
  the history at its length (the same encode as ``LayerStore``'s), the new token takes its ring
  slot, and the length and slot move on: every index on the device.

``sync()`` writes the state back into the store (the window in order), so eager use resumes where
the replays left it. Tests hold static steps to eager ones: the same codes, the same outputs to
float rounding. Decode only (one query token per step); TurboQuant codecs on torch, through the
Triton whole-call kernels (CUDA; the interpreter on CPU in tests).
"""

from __future__ import annotations

from . import kernels
from .kvstore import LayerStore


class StaticLayer:
    """The decode step of ``store`` (a full-attention ``LayerStore`` in its steady state) for up to
    ``capacity`` held history tokens, with every index on the device (see the module docstring)."""

    def __init__(self, store: LayerStore, capacity: int):
        import torch

        if not isinstance(store, LayerStore):
            raise TypeError(f"store must be a LayerStore, got {type(store).__name__}")
        if store.span:
            raise ValueError("a sliding-window layer (span) has no static step; use the eager one")
        if store.simulate:
            raise ValueError("a store in simulated mode has no static step")
        n_win = 0 if store.win_k is None else store.win_k.shape[2]
        n_sink = 0 if store.sink_k is None else store.sink_k.shape[2]
        if not isinstance(store.win_k, torch.Tensor):
            raise ValueError("store must hold torch tensors with a full window (steady state) for a static step")
        if store.window < 1 or n_win != store.window or n_sink != store.sinks or store.hist_k.held < 1:
            raise ValueError(f"store must be in its steady state for a static step: sinks {n_sink} of "
                             f"{store.sinks}, window {n_win} of {store.window} (at least 1), "
                             f"{store.hist_k.held} tokens encoded (at least 1)")
        held = store.hist_k.held
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= held:
            raise ValueError(f"capacity must be an int > the {held} encoded tokens held, got {capacity!r}")
        self.store, self.capacity = store, capacity
        like = store.win_k
        for hist in (store.hist_k, store.hist_v):  # (a full-attention layer's history starts at slot 0)
            hist.reserve(like, capacity)
        dev = like.device
        self.ring_k, self.ring_v = store.win_k.clone(), store.win_v.clone()  # (B, H, window, D)
        self.length = torch.tensor([held], dtype=torch.int64, device=dev)  # encoded tokens held
        self.slot = torch.zeros(1, dtype=torch.int64, device=dev)  # the ring's oldest token
        self._synced = held
        b, h = like.shape[:2]
        self.spill_k = {name: torch.empty((b, h, 1) + tuple(t), dtype=getattr(torch, dt), device=dev)
                        for name, (t, dt) in store.codec_k.fields().items()}
        self.spill_v = {name: torch.empty((b, h, 1) + tuple(t), dtype=getattr(torch, dt), device=dev)
                        for name, (t, dt) in store.codec_v.fields().items()}
        self._fn = None

    def step(self, q, k, v, scale: float, out=None):
        """Attend ``q`` (B, Hq, 1, D) over what is held plus this step's ``k``, ``v`` (B, H, 1, D),
        then hold them: returns (B, Hq, 1, D) in ``q``'s dtype (into ``out`` when given). No host
        read, no allocation that depends on the length: a CUDA graph of it stays valid while the
        history grows (at most ``capacity`` tokens held: more writes past the buffers)."""
        s = self.store
        if q.shape[2] != 1 or k.shape[2] != 1:
            raise ValueError(f"a static step takes one query and one new token, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if s.center_k is not None:  # keys are held centered (CacheConfig.center)
            k = (k.float() - s.center_k).to(k.dtype)
        if self._fn is None:
            self._fn = s.attention_step(q, k.shape[1])
            if self._fn is None:
                raise ValueError("a static step needs the whole-call attention kernels (Triton on CUDA) "
                                 "for this codec, query shape and head_dim")
        sinks = None if s.sink_k is None else (s.sink_k, s.sink_v)
        hist_k, hist_v = s.hist_k.buffers, s.hist_v.buffers
        out = self._fn(q, (sinks, (self.ring_k, self.ring_v), (k, v)), hist_k, hist_v, self.capacity, scale,
                       length_dev=self.length, out=out)
        # The ring's oldest token leaves the window: encoded at the history's length.
        old_k, old_v = self.ring_k.index_select(2, self.slot), self.ring_v.index_select(2, self.slot)
        if not kernels.encode_pair_into(s.codec_k, s.codec_v, old_k, old_v, self.spill_k, self.spill_v):
            for codec, x, views in ((s.codec_k, old_k, self.spill_k), (s.codec_v, old_v, self.spill_v)):
                if not codec.encode_into(x, views):
                    for name, value in codec.encode(x).items():
                        views[name].copy_(value)
        for buffers, spill in ((hist_k, self.spill_k), (hist_v, self.spill_v)):
            for name, value in spill.items():
                buffers[name].index_copy_(2, self.length, value)
        self.ring_k.index_copy_(2, self.slot, k.to(self.ring_k.dtype))
        self.ring_v.index_copy_(2, self.slot, v.to(self.ring_v.dtype))
        self.length.add_(1)
        self.slot.add_(1).remainder_(self.ring_k.shape[2])
        return out

    def sync(self) -> None:
        """Write the state back into the store (one host read): its history length, its window in
        order, its token count; eager ``update`` calls continue from there."""
        import torch

        s = self.store
        n = int(self.length.item())
        steps = n - self._synced
        slot = int(self.slot.item())
        for hist in (s.hist_k, s.hist_v):
            hist.n = n
        s.win_k = torch.cat([self.ring_k[:, :, slot:], self.ring_k[:, :, :slot]], 2)
        s.win_v = torch.cat([self.ring_v[:, :, slot:], self.ring_v[:, :, :slot]], 2)
        s.length += steps
        self._synced = n
