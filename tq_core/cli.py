"""``tq``: inspect the install, generate through a compressed cache, compare with the baseline.

    tq info
    tq run     [--model M] [--prompt P] [--config K4V2+s4w128 | --bits-k 4 --bits-v 2 ...] [--backend torch|mlx]
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
    from .methods import METHODS

    print(f"methods: {', '.join(METHODS)} (--config LABEL, e.g. K4V2+s4w128, uniform:K4V2+s4w128+g=32)")
    print(f"codebooks: dims {', '.join(map(str, codebook.SHIPPED_DIMS))} x bits 1..8 shipped; "
          f"others generated into {codebook.cache_dir()}")
    try:
        gguf = models.locate_gguf()
        print(f"default model: {models.DEFAULT_MODEL} ({gguf.name})")
    except FileNotFoundError as e:
        print(f"default model: unavailable ({e})")
    print(f"cache folder: {models.cache_dir()}")
    return 0


BACKENDS = {"torch": "hf", "mlx": "mlx_lm"}  # --backend -> the integration that runs it


def _integration(backend: str):
    import importlib

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    return importlib.import_module(f"tq_core.integrations.{BACKENDS[backend]}")


def _load(args):
    """(model, tokenizer, integration) for --backend: the model loads once, patched per run."""
    from . import models

    integration = _integration(args.backend)  # a bad backend fails here, before the model loads
    loaders = {"torch": lambda: models.load_hf(args.model, device=args.device), "mlx": lambda: models.load_mlx(args.model)}
    model, tok = loaders[args.backend]()
    return model, tok, integration


def _config(args):
    from .config import CacheConfig

    if args.config is not None:
        return CacheConfig.parse(args.config)
    return CacheConfig(bits_k=args.bits_k, bits_v=args.bits_v, sinks=args.sinks, window=args.window,
                       seed=args.seed)


def _generate(model, tok, integration, ids, config, n: int):
    """(new token ids, their text, bytes the cache held): the baseline cache when ``config`` is None,
    else a compressed one with attention over its codes (the model patched for the call)."""
    from . import patch, unpatch

    if config is not None:
        patch(model, config=config)
    try:
        cache = integration.baseline_cache(model) if config is None else integration.make_cache(model, config)
        new = integration.greedy(model, tok, ids, cache, n)
    finally:
        unpatch(model)
    from .greedy import hf_tokenizer

    text = hf_tokenizer(tok).decode(new, skip_special_tokens=True)
    return new, text, integration.cache_nbytes(cache)


def _fp16_bytes(model, n_tokens: int) -> int:
    from .models import geometry

    geo = geometry(getattr(model, "config", None) or model.args)
    return geo.fp16_bytes_per_token * n_tokens


def _prompt(tok, prompt: str) -> list[int]:
    from .greedy import hf_tokenizer, prompt_ids

    return prompt_ids(hf_tokenizer(tok), prompt)[0]


def cmd_run(args) -> int:
    config = _config(args)
    model, tok, integration = _load(args)
    ids = _prompt(tok, args.prompt)
    new, text, held = _generate(model, tok, integration, ids, config, args.max_new_tokens)
    fp16 = _fp16_bytes(model, len(ids) + len(new) - 1)
    print(text)
    print(f"[{config.label} {args.backend}] {len(ids)} prompt + {len(new)} new tokens; cache holds "
          f"{held:,} B vs {fp16:,} B as fp16 ({held / fp16:.3f}x)", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    config = _config(args)
    model, tok, integration = _load(args)
    ids = _prompt(tok, args.prompt)
    base = _generate(model, tok, integration, ids, None, args.max_new_tokens)
    comp = _generate(model, tok, integration, ids, config, args.max_new_tokens)
    from .greedy import match

    rate, first = match(base[0], comp[0])
    print(f"--- baseline ({args.backend}, uncompressed cache, {base[2]:,} B)")
    print(base[1])
    print(f"--- {config.label} ({args.backend}, {config.method} cache, {comp[2]:,} B)")
    print(comp[1])
    where = "none" if first is None else f"token {first}"
    print(f"--- token match rate {rate:.3f} over {max(len(base[0]), len(comp[0]))} tokens; "
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
        s.add_argument("--config", default=None, help="a cache config label, e.g. K4V2+s4w128 or uniform:K4V2+s4w128 "
                                                       "(instead of --bits-k/--bits-v/--sinks/--window/--seed)")
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
