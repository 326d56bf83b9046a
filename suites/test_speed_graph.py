"""Speed of a decode step replayed as a CUDA graph: the compressed cache vs the bf16 cache, all 32
layers of the llama3-8b geometry (8 KV heads x d128, 32 query heads), no weights.

Serving stacks capture their decode step once as a CUDA graph and replay it, so the host's Python
and launch costs vanish and a step costs its device time. ``test_speed.py`` times the eager step
(what a plain transformers loop pays); this module times the replayed one, both caches captured
the same way:

* compressed: per layer ``graph_step.StaticLayer.step`` (attention over sinks, the packed history,
  the window ring and the new token in the whole-call kernels, then the token leaving the window
  encoded into the history (on a side stream beside the attention with ``overlap=1``, in order with
  ``overlap=0``) and the new one written into the ring; five launches), and one shared
  clock moved on per step: every index on the device, so each replay is the next decode step (the
  history grows by one token per replay);
* bf16 baseline: per layer the new token written in place into a preallocated (B, 8, capacity, 128)
  cache, then SDPA over the ``context + 1`` tokens held, with torch's flash backend and with torch's
  own choice (cuDNN on an H200; a fixed length suits it), each captured and timed; the faster one is
  the baseline (``baseline_backend`` label). Its length is fixed by the capture, so each replay
  repeats the step at that context.

Clock: ``benchmark.pedantic`` rounds of ``graph.replay()`` + synchronize (the compressed step), and
the baseline's replays timed by hand in each round's setup, interleaved; medians. Recorded:
``decode_tokens_per_s`` per cache (labels ``context``, ``batch``, ``mode=graph``), ``speed_ratio``
(compressed / the faster baseline), the per-step milliseconds. torch-cuda only: CUDA graphs need a
CUDA device; other backends skip with the reason. Speed is recorded, never asserted; the gates
check that the replayed steps really held and read encoded history.
"""

from __future__ import annotations

import pytest

from fixtures import models as registry
from harness import timing
from suites import gates

SHAPE = registry.SHAPES[0]  # llama3-8b-shape
CASES = [(4096, 1), (32768, 1), (32768, 8), (131072, 1)]  # (context, batch)
ROUNDS, WARMUP = 20, 3


@pytest.fixture(autouse=True)
def _cuda_only(backend):
    if backend != "torch-cuda":
        pytest.skip(f"{backend}: a CUDA graph replay needs torch on a CUDA device (--tq-target torch-cuda)")


@pytest.mark.codec
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap=1", "overlap=0"])
@pytest.mark.parametrize("context,batch", CASES, ids=[f"context={c}" + (f"-batch={b}" if b > 1 else "") for c, b in CASES])
def test_graph_decode_tokens_per_s(backend, host, context, batch, overlap, benchmark, record, headline):
    import torch

    from tq_core.graph_step import StaticLayer

    config = headline
    layers, h, hq, d = SHAPE.layers, SHAPE.kv_heads, SHAPE.heads, SHAPE.head_dim
    dtype = torch.bfloat16
    scale = d ** -0.5
    steps = ROUNDS + WARMUP + 2
    capacity = context + steps + 1
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device="cuda", dtype=dtype)

    # The compressed cache: every layer filled with the same random context, then made static.
    cache = host.shape_cache(layers, config, reserve=capacity)
    base_k = torch.empty((layers, batch, h, capacity, d), device="cuda", dtype=dtype)
    base_v = torch.empty_like(base_k)
    for layer in range(layers):
        k, v = randn(batch, h, context, d), randn(batch, h, context, d)
        host.update(cache, layer, k, v)
        base_k[layer, :, :, :context], base_v[layer, :, :, :context] = k, v
        del k, v
    stores = host.stores(cache)
    clock = torch.zeros(1, dtype=torch.int64, device="cuda")  # one clock for all layers, moved once per step
    statics = [StaticLayer(s, capacity - config.sinks - config.window, clock=clock, overlap=overlap) for s in stores]
    q = randn(batch, hq, 1, d)
    new = [(randn(batch, h, 1, d), randn(batch, h, 1, d)) for _ in range(layers)]
    outs = [torch.empty((batch, hq, 1, d), device="cuda", dtype=dtype) for _ in range(layers)]

    def tq_step():
        for layer, st in enumerate(statics):
            st.step(q, *new[layer], scale, out=outs[layer])
        clock.add_(1)

    pos = torch.tensor([context], device="cuda", dtype=torch.int64)

    def base_step(sdpa_backend):
        def step():
            for layer in range(layers):
                base_k[layer].index_copy_(2, pos, new[layer][0])
                base_v[layer].index_copy_(2, pos, new[layer][1])
                outs[layer].copy_(host.sdpa(q, base_k[layer, :, :, :context + 1], base_v[layer, :, :, :context + 1],
                                            scale, backend=sdpa_backend))
        return step

    base_graphs, refused = {}, {}
    for b in host.sdpa_backends():
        try:
            base_graphs[b] = host.graph(base_step(b))
        except RuntimeError as e:  # a backend that cannot be captured is left out, and said so
            refused[b] = str(e).splitlines()[0][:200]
            torch.cuda.synchronize()
    assert base_graphs, f"no SDPA backend could be captured: {refused}"
    base_s = {b: host.replay_seconds(g, ROUNDS) for b, g in base_graphs.items()}
    best = min(base_s, key=base_s.get)
    tq_graph = host.graph(tq_step)  # its eager warm-up run is the first decode step
    base = timing.HandTimer(WARMUP)

    def setup():
        with base.round():
            base_graphs[best].replay()
            torch.cuda.synchronize()
        return (), {}

    def target():
        tq_graph.replay()
        torch.cuda.synchronize()

    benchmark.group = f"graph decode {SHAPE.name} {backend}"
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    replays = 1 + (ROUNDS + WARMUP if timing.median(benchmark) is not None else 1)
    for st in statics:
        st.sync()
    # Not timing checks: every replay was a real decode step over the codes.
    assert stores[0].length == context + replays
    gates.check_history_encoded(stores[0].encoded_tokens, context + replays, config)
    med = timing.median(benchmark)
    if med is None:
        return
    labels = dict(model=SHAPE.name, context=context, layers=layers, mode="graph", overlap=int(overlap),
                  **({"batch": batch} if batch > 1 else {}), dtype="bfloat16", **timing.conditions(host))
    tps = {"baseline": 1 / base.median, config.label: 1 / med}
    for name, value in tps.items():
        gates.check_speed_rate(f"decode_tokens_per_s[{name}]", value)
        record("decode_tokens_per_s", value, "tok/s", cache=name,
               **({"baseline_backend": best} if name == "baseline" else {}), **labels)
    for b, s in base_s.items():
        record("step_ms", s * 1e3, "ms", cache="baseline", baseline_backend=b, **labels)
    record("step_ms", med * 1e3, "ms", cache=config.label, **labels)
    record("speed_ratio", tps[config.label] / tps["baseline"], "x", phase="decode", config=config.label,
           baseline_backend=best, **labels)
    benchmark.extra_info.update(labels, baseline_ms={b: s * 1e3 for b, s in base_s.items()},
                                baseline_refused=refused, decode_ratio=tps[config.label] / tps["baseline"])
