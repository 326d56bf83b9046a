"""Attention: what the compressed cache does to each layer's attention, on the model's own Q/K/V.

Inputs: the post-RoPE queries, keys and values of one forward pass of the real model over
``harness.capture.TOKENS`` corpus tokens (the ``captured_qkv`` fixture), per layer.

Protocol (decode semantics, as in generation): query position ``t`` reads the cache as it stands
after tokens ``0..t-1`` were stored, plus its own token in full precision. With ``sinks`` S and
``window`` W that is: key/value ``j <= t`` is full precision when ``j < S`` or ``j >= t - W``,
the decoded codes otherwise. The decoded vectors come from ``LayerStore.update`` itself (the
cache's own store: method, bits, ``derive_seed`` rotation, norm correction, sinks, window): it is
fed positions ``0..T-2`` (arrays of the backend under test, ``host.from_numpy``) and then the last
token, exactly as at the last generation step, and the ``View`` it returns, decoded
(``View.dense``), holds every position any earlier query ever reads as codes. Codes are written
once and never re-encoded, so those decoded vectors are what every earlier query read too (checked
at a second point, t = T/2, for the first layer measured), and the per-(t, j) full-precision/codes split above is
checked against what the store returned (full precision exactly there, codes elsewhere). "Full
precision" is what the store holds: sinks and window in 16 bits (the input's dtype when it is
16-bit, else bfloat16), so they must equal the originals rounded to that dtype, bit for bit; the
query's own token is attended as given (exactly the original). The metrics below measure what the
codes do (the keys and values read as codes); the 16-bit rounding of a float32 capture's sinks and
window is not part of them.

Queries scored: the last ``QUERY_ROWS`` positions (256 of 512: at t = 256 the K4/V2 default
cache holds 124 of 257 keys as codes, at t = 511, 379 of 512), every query head (GQA: query head
h reads KV head h // (heads / kv_heads); 9 heads over 3 on the default model). The baseline is the
same attention on the original K/V, recomputed in torch float32 on one CPU thread
(``host.threads(1)`` of torch-cpu) for every backend (the backend under test runs the codec), once
per (layer, rows) for the module (the ``baselines`` fixture),
and checked against the attention output the model itself produced (max error < 1e-4 relative).
Float32 here matches a float64 computation to <= 3e-6 relative in 1 - cos, KL and rel. error.

Layers: the full-attention layers of the model (``real_spec.full_layers``), the ones every host's
cache encodes. Layers of other types (sliding window, chunked or linear attention) are excluded by
type: the cache keeps them as the host library does (no codes to measure), and this suite's
baseline, full causal attention, is not what they compute. Each record names the model and the
layers measured when some are excluded (``model``, ``layers=<measured>/<total>``).

Metrics per layer (label ``layer=i``; then the mean over the measured layers): cosine similarity of
the attention outputs (mean, min over rows), KL(p_base || p_cache) of the attention weights (mean),
top-8 overlap of the weights, and the relative output error |o_cache - o_base| / |o_base|.
Gates by model, config label and protocol (``gates.check_attention``: the model's calibration
table); every gated test records ``gate_calibrated`` and the table it used (``calibration``).
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import targets
from harness import hosts
from suites import gates
from tq_core.kvstore import LayerStore

QUERY_ROWS = 256  # last positions scored, both tiers (the gates are set for this protocol)
TOP_K = 8
METRICS = ("cos_mean", "cos_min", "kl_mean", "top8_overlap", "rel_err_mean")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The torch reference math on one CPU thread (a 2-core box shared with other jobs: the default
    pool mostly waits in barriers); the capture needs torch-cpu anyway."""
    if targets.missing_reason("torch-cpu"):
        yield
        return
    with hosts.get("torch-cpu").threads(1):
        yield


# ---- attention math: torch on CPU, float32, one thread (the same reference for every backend) ----
def full_precision_mask(t: np.ndarray, T: int, sinks: int, window: int) -> np.ndarray:
    """(R, T) True where query t reads key j at full precision under decode semantics."""
    j = np.arange(T)[None, :]
    return (j < sinks) | (j >= t[:, None] - window)


class Baselines:
    """Baseline attention per (capture, layer, rows), computed once for the module's tests."""

    def __init__(self):
        self._held: dict = {}

    def get(self, cap, layer: int, rows: int) -> dict:
        key = (id(cap), layer, rows)
        if key not in self._held:
            self._held[key] = baseline(cap, layer, rows)
        return self._held[key]

    def clear(self) -> None:
        self._held.clear()


@pytest.fixture(scope="module")
def baselines():
    held = Baselines()
    yield held
    held.clear()


def baseline(cap, layer: int, rows: int) -> dict:
    """Attention of the last ``rows`` positions of ``layer`` on the original K/V (torch float32, CPU)."""
    import torch

    T, group = cap.tokens, cap.heads // cap.kv_heads
    t = np.arange(T - rows, T)
    q = torch.from_numpy(cap.q[layer][0, :, T - rows:])  # (H, R, D)
    k = torch.from_numpy(cap.k[layer][0]).repeat_interleave(group, 0)  # (H, T, D); head h -> h // group
    v = torch.from_numpy(cap.v[layer][0]).repeat_interleave(group, 0)
    causal = torch.from_numpy(np.arange(T)[None, :] <= t[:, None])  # (R, T)
    s = (q @ k.transpose(1, 2) * cap.scaling).masked_fill(~causal, -torch.inf)
    o = torch.softmax(s, -1) @ v
    # The attention recomputed here is the attention the model ran.
    model_o = torch.from_numpy(cap.out[layer][0, :, T - rows:])
    err = float((o - model_o).abs().max() / model_o.abs().max())
    assert err < 1e-4, f"layer {layer}: recomputed attention differs from the model's by {err:.2e}"
    return dict(t=t, q=q, k=k, v=v, s=s, o=o, causal=causal, top=torch.topk(s, TOP_K, -1).indices)


def cache_view(cap, layer: int, config, host, mid: bool | None = None):
    """(K, V) as the cache holds them for the last position, (kv_heads, T, D) float32.

    Fed through ``LayerStore.update`` exactly as in generation's last step: every earlier position
    stored, then the last token. Positions ``sinks <= j < T-1-window`` come back decoded -- the
    only positions any query ``t <= T-1`` reads as codes -- the rest in full precision: the sinks
    and window as the store holds them (the originals rounded to its 16-bit dtype, exactly), the
    last token as given (exactly the original). Codes are written once and never re-encoded, so
    these decoded vectors are what every earlier query read too; that is checked at a second point
    (t = T/2) when ``mid`` (default: for layer 0).
    """
    T = cap.tokens
    kb, vb = host.from_numpy(cap.k[layer]), host.from_numpy(cap.v[layer])

    def rounded(orig: np.ndarray, like) -> np.ndarray:
        """``orig`` (kv_heads, T, D) rounded to the dtype the store holds the sinks and window of
        ``like``'s dtype in: that dtype when it is 16-bit, else bfloat16."""
        held = like.dtype if like.dtype in (host.float16, host.bfloat16) else host.bfloat16
        return hosts.to_numpy(host.from_numpy(orig, held)).astype(np.float32)

    def view_at(t: int):
        store = LayerStore(config, layer, cap.head_dim)
        if t > 0:
            store.update(kb[:, :, :t], vb[:, :, :t])
        view = store.update(kb[:, :, t: t + 1], vb[:, :, t: t + 1])
        return tuple(hosts.to_numpy(a)[0].astype(np.float32) for a in view.dense(kb.dtype, vb.dtype))

    k_hat, v_hat = view_at(T - 1)
    # Keys held centered (c=1): what is held is the centered key rounded to 16 bits (the sinks held
    # before the center existed: rounded, centered, rounded again), given back with the center added.
    centered = config.centers_keys
    for name, got, orig, like in (("K", k_hat, cap.k[layer][0], kb), ("V", v_hat, cap.v[layer][0], vb)):
        assert got.shape == orig.shape, f"layer {layer}: store returned {name} {got.shape}, expected {orig.shape}"
        orig16 = rounded(orig, like)
        fp = full_precision_mask(np.array([T - 1]), T, config.sinks, config.window)[0]
        held_fp, own = fp.copy(), np.arange(T) == T - 1
        held_fp[T - 1] = False
        # Full precision exactly where decode semantics say: the held sinks and window as the
        # originals rounded to the store's 16-bit dtype, the last token (this call's own) as given ...
        if name == "K" and centered:
            tol = 2.0 ** -7 * (2 * np.abs(orig).max() + 1e-6)  # two 16-bit roundings on the raw keys' scale
            assert np.abs(got[:, held_fp] - orig[:, held_fp]).max() <= tol, f"layer {layer}: K full-precision part altered"
        else:
            assert np.array_equal(got[:, held_fp], orig16[:, held_fp]), f"layer {layer}: {name} full-precision part altered"
        assert np.array_equal(got[:, own], orig[:, own]), f"layer {layer}: {name} own token altered"
        # ... codes elsewhere: neither the originals nor their 16-bit rounding.
        if (~fp).any():
            assert not np.array_equal(got[:, ~fp], orig[:, ~fp]), f"layer {layer}: {name} history not quantized"
            assert not np.array_equal(got[:, ~fp], orig16[:, ~fp]), f"layer {layer}: {name} history not quantized"
    if (layer == 0) if mid is None else mid:
        t_mid = T // 2
        k_mid, v_mid = view_at(t_mid)
        coded = ~full_precision_mask(np.array([t_mid]), t_mid + 1, config.sinks, config.window)[0]
        for name, a, b in (("K", k_mid, k_hat), ("V", v_mid, v_hat)):
            # Same codes decode to the same vectors up to float rounding (a GPU matmul may pick
            # another kernel for another history length); a rewritten code moves a vector by far more.
            a, b = a[:, coded], b[:, : t_mid + 1][:, coded]
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (
                f"{name} history decoded at t={t_mid} differs from t={T - 1}: codes were rewritten")
    return k_hat, v_hat


def layer_metrics(cap, layer: int, config, host, rows: int, baselines: Baselines | None = None,
                  mid: bool | None = None) -> dict:
    """Metrics of one layer under ``config``, the codec run on ``host``; ``baselines``: where the
    baseline attention is kept between calls (None: computed here); ``mid``: see ``cache_view``."""
    import torch

    b = baseline(cap, layer, rows) if baselines is None else baselines.get(cap, layer, rows)
    T, group = cap.tokens, cap.heads // cap.kv_heads
    k_hat, v_hat = cache_view(cap, layer, config, host, mid)
    # k - k_hat; where never coded only the 16-bit rounding of sinks/window (masked out by ``coded``)
    dk = b["k"] - torch.from_numpy(k_hat).repeat_interleave(group, 0)
    dv = torch.from_numpy(v_hat).repeat_interleave(group, 0) - b["v"]  # v_hat - v
    coded = torch.from_numpy(~full_precision_mask(b["t"], T, config.sinks, config.window)) & b["causal"]
    # Scores the cache gives: s - delta, delta = q.(k - k_hat) * scale on the keys read as codes.
    delta = (b["q"] @ dk.transpose(1, 2) * cap.scaling) * coded
    s = b["s"] - delta
    p = torch.softmax(s, -1)
    pb = torch.softmax(b["s"], -1)
    # KL(p_base || p) = sum p_base delta + log sum p_base exp(-delta): no difference of two
    # log-sum-exps, so it keeps its relative precision in float32.
    kl = (pb * delta).sum(-1) + torch.log1p((pb * torch.expm1(-delta)).sum(-1))
    # o - o_base = (p - p_base) v + (p on coded values) (v_hat - v)
    do = ((p - pb) @ b["v"] + (p * coded) @ dv).double()
    ob = b["o"].double()
    o = ob + do
    cos = (o * ob).sum(-1) / (o.norm(dim=-1) * ob.norm(dim=-1))
    rel = do.norm(dim=-1) / ob.norm(dim=-1)
    top = torch.topk(s, TOP_K, -1).indices
    overlap = (top[..., :, None] == b["top"][..., None, :]).any(-1).sum(-1) / TOP_K
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "kl_mean": float(kl.double().mean()),
            "top8_overlap": float(overlap.double().mean()), "rel_err_mean": float(rel.mean())}


def measure(cap, cfg, host, rows, record, baselines: Baselines, only=None, **labels) -> dict:
    """Per-layer metrics of cache config ``cfg`` over the layers ``only`` (default: all captured),
    recorded with ``layer=i``; {metric: array over those layers}."""
    per = {m: [] for m in METRICS}
    layers = list(range(cap.layers) if only is None else only)
    for layer in layers:
        res = layer_metrics(cap, layer, cfg, host, rows, baselines, mid=layer == layers[0])
        for m in METRICS:
            record(f"attn_{m}", res[m], layer=layer, **labels)
            per[m].append(res[m])
    out = {m: np.array(vals) for m, vals in per.items()}
    for m, vals in out.items():
        se = vals.std(ddof=1) / np.sqrt(vals.size) if vals.size > 1 else None  # one layer: no spread
        record(f"attn_{m}_layers_mean", vals.mean(), error=se, **labels)
    record("attn_cos_min_layers_min", out["cos_min"].min(), **labels)
    return out


def measured_layers(spec, cap) -> list[int]:
    """The captured layers this suite measures: the full-attention ones (see the module docstring)."""
    assert cap.layers == spec.layers, f"captured {cap.layers} layers, {spec.name} has {spec.layers}"
    if not spec.full_layers:
        pytest.skip(f"{spec.name} has no full-attention layer (layer types {spec.describe()['layer_types']}): "
                    "no layer's history is held as codes")
    return spec.full_layers


def model_labels(spec, cap) -> dict:
    """``model``, and ``layers=<measured>/<total>`` when some layers are excluded by type."""
    out = dict(model=spec.name)
    if spec.mixed:
        out["layers"] = f"{len(spec.full_layers)}/{cap.layers}"
    return out


@pytest.mark.model
@pytest.mark.codec  # a peer's cache (no codec, no layer stores) skips: see conftest
def test_attention_per_layer(host, cache_config, captured_qkv, baselines, real_spec, model_info, record):
    rows = QUERY_ROWS
    layers = measured_layers(real_spec, captured_qkv)
    labels = dict(config=cache_config.label, queries=rows, **model_labels(real_spec, captured_qkv))
    out = measure(captured_qkv, cache_config, host, rows, record, baselines, layers, **labels)
    status = gates.check_attention(cache_config.label, out, model_info, backend=host.backend, queries=rows,
                                   tokens=captured_qkv.tokens)
    record("gate_calibrated", 1.0 if status == "calibrated" else 0.0, "bool", gate="attention",
           calibration=gates.calibration(model_info), **labels)


@pytest.mark.model
def test_norm_correction(host, captured_qkv, baselines, real_spec, model_info, record):
    """Plain K4/V2 (no sinks, no window) with norm correction on (the default) vs off.

    The default was chosen on PPL KLD 0.166 (on) vs 0.221 (off); this measures the same choice
    at the attention level, per layer, on the same Q/K/V.
    """
    plain = config_registry.PLAIN
    layers = measured_layers(real_spec, captured_qkv)
    mlabels = model_labels(real_spec, captured_qkv)
    out = {}
    for nc in (True, False):
        cfg = plain if nc else plain.replace(norm_correction=False)
        out[nc] = measure(captured_qkv, cfg, host, QUERY_ROWS, record, baselines, layers, config=cfg.label,
                          norm_correction=nc, queries=QUERY_ROWS, **mlabels)
    for m in METRICS:
        diff = out[True][m] - out[False][m]
        err = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else None
        record(f"attn_{m}_nc_on_minus_off", diff.mean(), error=err, **mlabels)
    for m, better in (("kl_mean", np.less), ("cos_mean", np.greater), ("top8_overlap", np.greater),
                      ("rel_err_mean", np.less)):
        record(f"layers_nc_on_better_{m}", int(better(out[True][m], out[False][m]).sum()), "layers", **mlabels)
    # Against the bands of both labels where the model's table has them (then on must beat off).
    status = gates.check_norm_correction(out, model_info, backend=host.backend, queries=QUERY_ROWS,
                                         tokens=captured_qkv.tokens)
    record("gate_calibrated", float(status == "calibrated"), "bool", gate="norm_correction", queries=QUERY_ROWS,
           calibration=gates.calibration(model_info), **mlabels)
