"""One layer's decode attention on a CUDA GPU: the whole-call path (View.attend's default there) vs
the composed path (history kernel + array ops, kernels.attention_step disabled) vs bf16 SDPA over
the same number of tokens, 8B geometry, K4/V2 + 4 sinks + 128 window.

    PYTHONPATH=. python bench/decode_step_h200.py      # prints one JSON line per shape, then profiles

Per shape: device time of the call replayed as a CUDA graph, wall time of eager calls, relative
error of each path against the array-ops path, and the eager time of a whole store step (update of
one token + attend). Then the kernels of ten calls at 1 x 32k (torch.profiler) and a cProfile of
the Python side of 200 store steps. Writes $OUT/prof_step.json when OUT is set.
"""
import json, os, sys, time
import torch
import torch.nn.functional as F
from tq_core import kernels
from tq_core.config import CacheConfig
from tq_core.kvstore import LayerStore

dev = torch.device("cuda")
torch.manual_seed(0)
cfg = CacheConfig.parse("K4V2+s4w128")
H, HQ, D = 8, 32, 128
scale = D ** -0.5
orig_step = kernels.attention_step


def graph_us(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    ts.sort()
    return ts[len(ts) // 2]


def eager_us(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e6 / reps)
    ts.sort()
    return ts[len(ts) // 2]


rows = []
for B, ctx in [(1, 4096), (1, 32768), (8, 4096), (8, 32768), (16, 32768), (8, 131072)]:
    st = LayerStore(cfg, 0, D)
    st.reserve(torch.empty(B, H, 1, D, device=dev, dtype=torch.bfloat16), ctx + 64)
    for i in range(0, ctx, 8192):
        n = min(8192, ctx - i)
        st.update(torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16), torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16))
    k1 = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16); v1 = torch.randn_like(k1)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    view = st.update(k1, v1)
    kb = torch.randn(B, H, ctx + 1, D, device=dev, dtype=torch.bfloat16); vb = torch.randn_like(kb)
    r = dict(B=B, ctx=ctx)
    r["sdpa_graph_us"] = graph_us(lambda: F.scaled_dot_product_attention(q, kb, vb, scale=scale, enable_gqa=True))
    r["sdpa_eager_us"] = eager_us(lambda: F.scaled_dot_product_attention(q, kb, vb, scale=scale, enable_gqa=True))
    r["step_graph_us"] = graph_us(lambda: view.attend(q, scale))
    r["step_eager_us"] = eager_us(lambda: view.attend(q, scale))
    kernels.attention_step = lambda *a, **k: None
    r["composed_graph_us"] = graph_us(lambda: view.attend(q, scale))
    r["composed_eager_us"] = eager_us(lambda: view.attend(q, scale))
    a_comp = view.attend(q, scale)
    kernels.attention_step = orig_step
    a_step = view.attend(q, scale)
    a_ops = view.attend(q, scale, kernel=False)
    r["rel_err_step_vs_ops"] = ((a_step.double() - a_ops.double()).norm() / a_ops.double().norm()).item()
    r["rel_err_composed_vs_ops"] = ((a_comp.double() - a_ops.double()).norm() / a_ops.double().norm()).item()
    # a whole store step (update of one token + attend), eager, as a decode loop runs it
    def full_step():
        st.update(k1, v1).attend(q, scale)
    r["update_attend_eager_us"] = eager_us(full_step, reps=20)
    r["speedup_graph"] = r["sdpa_graph_us"] / r["step_graph_us"]
    rows.append(r)
    print(json.dumps(r), flush=True)
    del st, view, kb, vb
    torch.cuda.empty_cache()

# kernels of one step call (1 x 32k)
st = LayerStore(cfg, 0, D)
st.update(torch.randn(1, H, 32768, D, device=dev, dtype=torch.bfloat16), torch.randn(1, H, 32768, D, device=dev, dtype=torch.bfloat16))
q = torch.randn(1, HQ, 1, D, device=dev, dtype=torch.bfloat16)
view = st.update(torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16), torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16))
for _ in range(3):
    view.attend(q, scale)
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
    for _ in range(10):
        view.attend(q, scale)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
import cProfile, pstats, io
k1 = torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16); v1 = torch.randn_like(k1)
for _ in range(5):
    st.update(k1, v1).attend(q, scale)
torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(200):
    st.update(k1, v1).attend(q, scale)
torch.cuda.synchronize(); pr.disable()
sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(22); print(sio.getvalue()[-6000:])
out = os.environ.get("OUT", ".")
json.dump(rows, open(os.path.join(out, "prof_step.json"), "w"), indent=1)
