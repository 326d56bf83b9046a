"""Checks the kernel parity tests share, whatever device runs the kernel (Triton on CUDA or under the
interpreter, the C library on CPU): an encode's outputs against ``TurboQuantizer.encode``, and a
whole attention call against the array-ops path and the decoded reference."""

from __future__ import annotations

import math

import torch

from tq_core import packing, rotation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def poisoned_outputs(N: int, nb: int, strided: bool, device="cpu"):
    """(codes, norms, buffers) to encode ``N`` rows of ``nb`` code bytes into, poisoned (0xAB, NaN):
    with ``strided`` the middle slots of (N, 3, nb + 4) / (N, 2) buffers, else whole tensors
    (``buffers`` then None)."""
    if strided:
        buf = torch.full((N, 3, nb + 4), 0xAB, dtype=torch.uint8, device=device)
        nbuf = torch.full((N, 2), math.nan, dtype=torch.float16, device=device)
        return buf[:, 1, 2:2 + nb], nbuf[:, 1], (buf, nbuf)
    codes = torch.full((N, nb), 0xAB, dtype=torch.uint8, device=device)
    norms = torch.full((N,), math.nan, dtype=torch.float16, device=device)
    return codes, norms, None


def check_untouched(nb: int, buffers) -> None:
    """Nothing around the strided slots of ``poisoned_outputs`` was written."""
    if buffers is None:
        return
    buf, nbuf = buffers
    untouched = torch.cat([buf[:, 0].flatten(), buf[:, 2].flatten(), buf[:, 1, :2].flatten(),
                           buf[:, 1, 2 + nb:].flatten()])
    assert bool((untouched == 0xAB).all()), "wrote outside the codes view"
    assert bool(torch.isnan(nbuf[:, 0]).all()), "wrote outside the norms view"


def check_encoded(q, x, codes, norms, seed: int = 5) -> None:
    """``codes`` and ``norms`` of rows ``x`` equal ``q.encode(x)``'s (``q`` built with ``seed``) except
    where float32 rounding decides: at most 1e-5 of the codes differ, each within 1e-5 / sqrt(D) of a
    boundary in the float64 rotation; norms of the other rows within one fp16 ulp; no NaN."""
    D, bits = q.dim, q.bits
    ref = q.encode(x, check=False)
    got = packing.unpack(codes.cpu().contiguous(), bits, D).long()
    want = packing.unpack(ref.codes, bits, D).long()
    bad = got != want
    n_bad = int(bad.sum())
    assert n_bad <= max(1, 1e-5 * got.numel()), f"{n_bad} of {got.numel()} codes differ"
    if n_bad:
        # Each flip is a float32 rounding decision: the exact coordinate is within 1e-5 (relative
        # to the coordinate scale 1/sqrt(D)) of a boundary.
        x64 = x.cpu().double()
        y = (x64 @ torch.tensor(rotation.haar(D, seed)).T) / x64.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        bnd = torch.tensor(q.codebook.boundaries)
        dist = (y[bad][:, None] - bnd[None, :]).abs().min(dim=1).values
        assert float(dist.max()) < 1e-5 / math.sqrt(D), f"a flip {float(dist.max()):.3g} away from a boundary"
    rows_ok = ~bad.any(dim=1)
    gn, wn = norms.cpu().float()[rows_ok], ref.norms.float()[rows_ok]
    ulp = torch.finfo(torch.float16).eps * wn.abs().clamp_min(2 ** -14)
    assert bool(((gn - wn).abs() <= ulp).all()), "norms differ by more than one fp16 ulp"
    assert not torch.isnan(norms.cpu()).any()


def attention_step_errors(case, gen, device="cpu"):
    """View.attend through a device's whole-call kernels for ``case`` = (config, dtype, B, Hkv, G,
    held, Tq, D): ``held`` tokens stored, then ``Tq`` new ones whose queries (a non-contiguous
    (B, Tq, Hq, D) transposed, as a host library hands them) attend. Returns (whether a whole-call
    kernel applied, the fast output, its relative error vs the array-ops path over the same stored
    codes, and vs the decoded reference: softmax over sinks | history decoded | window | own tokens,
    causal among the own tokens)."""
    from tq_core import kernels
    from tq_core.config import CacheConfig
    from tq_core.kvstore import LayerStore

    label, dt, B, Hkv, G, held, Tq, D = case
    dtype = DTYPES[dt]
    store = LayerStore(CacheConfig.parse(label), layer=3, head_dim=D)
    kv = lambda n: (torch.randn(B, Hkv, n, D, generator=gen) * 2).to(dtype).to(device)  # noqa: E731
    if held:
        store.update(kv(held), kv(held))
    k_new, v_new = kv(Tq), kv(Tq)
    q = torch.randn(B, Tq, Hkv * G, D, generator=gen).to(dtype).to(device).transpose(1, 2)
    view = store.update(k_new, v_new)
    scale = 1.0 / math.sqrt(D)
    whole_call = kernels.attention_step(store.codec_k, store.codec_v, q, Hkv) is not None
    fast = view.attend(q, scale, kernel=True)
    ops_path = view.attend(q, scale, kernel=False)
    assert fast.dtype == dtype and fast.shape == (B, Hkv * G, Tq, D)
    assert torch.isfinite(fast.float()).all()
    err = ((fast.double() - ops_path.double()).norm() / ops_path.double().norm()).item()
    k_all, v_all = view.dense(torch.float64, torch.float64)
    n_all = k_all.shape[2]
    kr, vr = k_all.repeat_interleave(G, 1), v_all.repeat_interleave(G, 1)
    s = scale * q.double() @ kr.transpose(-1, -2)
    own = torch.arange(n_all) >= n_all - Tq
    t = torch.arange(Tq)[:, None]
    causal = ~own[None, :] | (torch.arange(n_all)[None, :] - (n_all - Tq) <= t)
    ref = torch.softmax(s.masked_fill(~causal.to(device), -math.inf), -1) @ vr
    err_ref = ((fast.double() - ref).norm() / ref.norm()).item()
    return whole_call, fast, err, err_ref
