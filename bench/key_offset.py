"""How much of a model's keys is a constant offset, and what the codes' error is next to it.

    python bench/key_offset.py [MODEL] [--tokens 256] [--layers 0,1,13,27]

For each layer: mean key norm; the codes' relative MSE at 4 bits (TurboQuant, on those keys); and
|k - mean_t(k)|^2 / |k|^2, the share of a key's energy that changes from token to token (per KV
head, over the first TOKENS tokens of the default corpus, keys as the cache holds them: after
RoPE). When the codes' error is larger than that share, attention logits are mostly error.
torch CPU, uncompressed cache, one forward pass.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from harness.hosts import get as get_host
    from tq_core.quantizer import TurboQuantizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a --tq-model value (default: the default model)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", default="", help="comma list of layer indices (default: first, second, middle, last)")
    args = ap.parse_args(argv)
    from pydoc_data import topics

    host = get_host("torch-cpu")
    m = host.load(args.model)
    ids = host.tokenize(m, "".join(topics.topics.values()))[:args.tokens]
    cache = host.new_cache(m, None)
    host.forward(m, ids, cache)
    n = len(cache.layers)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted({0, 1, n // 2, n - 1})
    for li in layers:
        k = cache.layers[li].keys[0].float()  # (H, T, D)
        d = k.shape[-1]
        q = TurboQuantizer(d, 4, 7)
        k_hat = q.decode(q.encode(k.reshape(-1, d)), torch.float32).reshape(k.shape)
        rel_mse = ((k_hat - k).pow(2).sum(-1) / k.pow(2).sum(-1)).mean().item()
        varying = ((k - k.mean(1, keepdim=True)).pow(2).sum(-1) / k.pow(2).sum(-1)).mean().item()
        print(f"layer {li}: mean key norm {k.norm(dim=-1).mean():.1f}; codes' relative MSE (4 bits) {rel_mse:.4f}; "
              f"token-varying share of key energy {varying:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
