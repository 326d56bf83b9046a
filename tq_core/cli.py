"""``tq``: inspect the install, generate through a compressed cache, compare with the baseline.

    tq info
    tq run     [--model M] [--prompt P] [--bits-k 4] [--bits-v 2] [--backend torch|mlx]
    tq compare [same options]      baseline and compressed outputs, match rate, first divergence
    tq report  [--results DIR] [--out DIR] [--kld-regress 0.10] [--speed-regress 0.05]
                                   static site of every results file (reports/site.py)

Bad input prints one line ``tq: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    from . import codebook, models

    print(f"tq-core {_version('tq-core')}  python {platform.python_version()}  {platform.machine()}")
    for dist in ("numpy", "torch", "transformers", "mlx", "mlx-lm"):
        print(f"  {dist:<13}{_version(dist)}")
    print("backends:")
    if _version("torch") != "not installed":
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"  torch  cpu" + (f", cuda: {', '.join(cuda)}" if cuda else " (no CUDA device)"))
    else:
        print("  torch  missing: pip install 'tq-core[torch]'")
    if _version("mlx") != "not installed":
        import mlx.core as mx

        print(f"  mlx    {mx.default_device()}")
    else:
        print("  mlx    missing: pip install 'tq-core[mlx]' (Apple silicon) or 'tq-core[mlx-cpu]'")
    print(f"codebooks: dims {', '.join(map(str, codebook.SHIPPED_DIMS))} x bits 1..8 shipped; "
          f"others generated into {codebook.cache_dir()}")
    try:
        gguf = models.locate_gguf()
        print(f"default model: {models.DEFAULT_MODEL} ({gguf.name})")
    except FileNotFoundError as e:
        print(f"default model: unavailable ({e})")
    print(f"cache folder: {models.cache_dir()}")
    return 0


def _load(args):
    from . import models
    from .generation import check_backend

    check_backend(args.backend)
    if args.backend == "torch":
        return models.load_hf(args.model, device=args.device)
    return models.load_mlx(args.model)


def _config(args):
    from .config import CacheConfig

    return CacheConfig(bits_k=args.bits_k, bits_v=args.bits_v, sinks=args.sinks, window=args.window,
                       seed=args.seed)


def _fp16_bytes(model, n_tokens: int) -> int:
    from .generation import kv_shape

    layers, kv_heads, head_dim = kv_shape(model)
    return layers * kv_heads * head_dim * 2 * 2 * n_tokens


def cmd_run(args) -> int:
    from .generation import generate, prompt_ids

    config = _config(args)
    model, tok = _load(args)
    ids = prompt_ids(tok, args.prompt)
    out = generate(model, tok, ids, config, args.backend, args.max_new_tokens)
    held = out.cache_nbytes
    fp16 = _fp16_bytes(model, len(ids) + len(out.tokens) - 1)
    print(out.text)
    print(f"[{config.label} {args.backend}] {len(ids)} prompt + {len(out.tokens)} new tokens; cache holds "
          f"{held:,} B vs {fp16:,} B as fp16 ({held / fp16:.3f}x)", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .generation import generate, match, prompt_ids

    config = _config(args)
    model, tok = _load(args)
    ids = prompt_ids(tok, args.prompt)
    base = generate(model, tok, ids, None, args.backend, args.max_new_tokens)
    comp = generate(model, tok, ids, config, args.backend, args.max_new_tokens)
    rate, first = match(base.tokens, comp.tokens)
    print(f"--- baseline ({args.backend}, uncompressed cache, {base.cache_nbytes:,} B)")
    print(base.text)
    print(f"--- {config.label} ({args.backend}, TurboQuant cache, {comp.cache_nbytes:,} B)")
    print(comp.text)
    where = "none" if first is None else f"token {first}"
    print(f"--- token match rate {rate:.3f} over {max(len(base.tokens), len(comp.tokens))} tokens; "
          f"first divergence: {where}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message):
        print(f"tq: error: {message} (see tq --help)", file=sys.stderr)
        raise SystemExit(2)


def cmd_report(args) -> int:
    """The static site from the results folder. ``reports`` is imported here, never by the core."""
    import pathlib

    checkout = pathlib.Path(__file__).resolve().parents[1]  # a source checkout has reports/ beside tq_core/
    if (checkout / "reports" / "site.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from reports import site
    except ImportError as e:
        raise ImportError(f"tq report needs the repository's reports/ package and pip install 'tq-core[report]' "
                          f"({e})") from None
    try:
        return site.run(args)
    except FileExistsError as e:
        print(f"tq: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tq", description="TurboQuant KV-cache compression")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, backends, devices, codebooks")
    for name, help_ in (("run", "generate with a compressed cache"),
                        ("compare", "baseline vs compressed generation side by side")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default=None, help="HF id or local folder (default: SmolLM2-135M-Instruct)")
        s.add_argument("--prompt", default=DEFAULT_PROMPT)
        s.add_argument("--bits-k", type=int, default=4)
        s.add_argument("--bits-v", type=int, default=2)
        s.add_argument("--sinks", type=int, default=None)
        s.add_argument("--window", type=int, default=None)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--backend", default="torch", help="torch or mlx")
        s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
        s.add_argument("--max-new-tokens", type=int, default=48)
    r = sub.add_parser("report", help="static site from the results folder: latest status, trends, regressions")
    r.add_argument("--results", default=None, help="results folder (default: $TQ_RESULTS_DIR or reports/results)")
    r.add_argument("--out", default=None, help="site folder (default: reports/site)")
    r.add_argument("--kld-regress", type=float, default=0.10,
                   help="flag mean KLD up by more than this fraction vs the previous run (default 0.10)")
    r.add_argument("--speed-regress", type=float, default=0.05,
                   help="flag throughput down by more than this fraction vs the previous run (default 0.05)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for field in ("sinks", "window"):
        if getattr(args, field, 0) is None:
            from .config import CacheConfig

            setattr(args, field, getattr(CacheConfig(), field))
    handler = {"info": cmd_info, "run": cmd_run, "compare": cmd_compare, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, NotImplementedError) as e:
        print(f"tq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
