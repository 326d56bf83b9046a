"""Planted-defect self-test: do the suites catch the defects they exist to catch?

Each defect is planted through a public seam, never by editing the code under test:

* a KV method registered under the default method's name in ``tq_core.METHODS`` (the label of
  every config stays the same: a broken cache that "keeps its label");
* the layer-store class the integrations build (``tq_core.integrations.hf.LayerStore``,
  ``tq_core.integrations.mlx_lm.LayerStore``);
* a harness function the suites call through its module (``harness.scoring.logprobs``);
* the model conversion (``tq_core.models._convert_gguf``) into a fresh ``TQ_CACHE_DIR``.

Two parts in one file:

* a pytest plugin: ``pytest suites ... -p harness.selftest`` with ``TQ_SELFTEST_DEFECT=<name>``
  plants that defect once conftest has configured the run (so MLX's BLAS is loaded first);
* the driver: ``python -m harness.selftest`` (what ``nox -s selftest`` runs) runs a selection of
  the default tier once with nothing planted (the control: it must pass) and once per defect (each
  must make at least one suite fail), two runs at a time, prints which suite caught which defect,
  and exits 1 if the control failed or any defect went unseen.

The selection (``selection``) keeps a run to about a minute on 2 CPU cores: the memory suite on the
real model's geometry (1024 tokens), the attention suite, perplexity at chunk 64 (the headline
config and plain K4V2), the compressed generation golden of one prompt (torch), and MLX's
cross-backend baseline floor when MLX is present; all for the headline config
(``--tq-config K4V2+s4w128``). The whole self-test takes ~5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import pytest

ENV = "TQ_SELFTEST_DEFECT"
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ==== the defects ======================================================================================
def _planted_method(make_codec):
    """The default method ("turboquant") with its codecs replaced by ``make_codec(real codec)``."""
    from tq_core.methods.turboquant import TurboQuant

    class Planted(TurboQuant):
        def codec(self, config, layer, kind, dim):
            return make_codec(super().codec(config, layer, kind, dim))

    return Planted()


def _register(make_codec) -> None:
    from tq_core import METHODS

    METHODS["turboquant"] = _planted_method(make_codec)


def plant_decode_originals() -> None:
    """Stores real packed codes (memory looks right) but decodes, and attends, from a hidden copy of
    the original vectors it keeps beside them."""
    from tq_core.methods.base import Codec
    from tq_core.ops import for_array

    class OriginalsCodec(Codec):  # not a TurboQuantCodec: no fused kernel reads the real codes
        def __init__(self, inner):
            self.inner, self.dim, self.bits = inner, inner.dim, inner.bits
            self.originals = None

        def fields(self):
            return self.inner.fields()

        def encode(self, x):
            ops = for_array(x)
            self.originals = x if self.originals is None else ops.concat([self.originals, x], 2)
            return self.inner.encode(x)

        def decode(self, parts, dtype=None):
            ops = for_array(self.originals)
            n = next(iter(parts.values())).shape[2]
            return ops.astype(self.originals[:, :, :n], ops.float32 if dtype is None else dtype)

    _register(OriginalsCodec)


def plant_byte_per_code() -> None:
    """Codes stored one byte per code (unpacked): every value right, 8 bits per channel held."""
    from tq_core import packing
    from tq_core.methods.base import Codec

    class BytePerCode(Codec):
        def __init__(self, inner):
            self.inner, self.dim, self.bits = inner, inner.dim, inner.bits

        def fields(self):
            return {**self.inner.fields(), "codes": ((self.dim,), "uint8")}

        def encode(self, x):
            parts = self.inner.encode(x)
            return {**parts, "codes": packing.unpack(parts["codes"], self.bits, self.dim)}

        def _packed(self, parts):
            return {**parts, "codes": packing.pack(parts["codes"], self.bits)}

        def decode(self, parts, dtype=None):
            return self.inner.decode(self._packed(parts), dtype)

        def query(self, q):
            return self.inner.query(q)

        def values_space(self, parts, dtype):
            return self.inner.values_space(self._packed(parts), dtype)

        def output(self, u):
            return self.inner.output(u)

    _register(BytePerCode)


def plant_never_compresses() -> None:
    """A cache that keeps every vector in fp16 and hands it back: never compresses, keeps its label."""
    from tq_core.methods.base import Codec
    from tq_core.ops import for_array

    class FullPrecision(Codec):
        def __init__(self, inner):
            self.dim, self.bits = inner.dim, inner.bits

        def fields(self):
            return {"x": ((self.dim,), "float16")}

        def encode(self, x):
            ops = for_array(x)
            return {"x": ops.astype(x, ops.float16)}

        def decode(self, parts, dtype=None):
            ops = for_array(parts["x"])
            return ops.astype(parts["x"], ops.float32 if dtype is None else dtype)

    _register(FullPrecision)


def plant_rotation_seed() -> None:
    """Encodes with the layer's rotation, decodes (and attends) with the rotation of seed + 1."""
    from tq_core import TurboQuantizer
    from tq_core.methods.turboquant import TurboQuantCodec

    class OtherSeed(TurboQuantCodec):
        def __init__(self, inner):
            super().__init__(inner.q, inner.fused)
            q = inner.q
            self.q2 = TurboQuantizer(q.dim, q.bits, q.seed + 1, norm_correction=q.norm_correction)

        def decode(self, parts, dtype=None):
            return self.q2.decode_parts(parts["codes"], parts["norms"], dtype)

        def query(self, q):
            return self.q2.rotate(q)

        def values_space(self, parts, dtype):
            return self.q2.centroid_values(parts["codes"], parts["norms"], dtype)

        def output(self, u):
            return self.q2.unrotate(u)

    _register(OtherSeed)


def plant_window_ignored() -> None:
    """Attention over the codes (``View.attend``, the fast path) leaves the recent window out; the
    decoded reference path (``View.dense``) is untouched."""
    from tq_core.kvstore import LayerStore, View
    from tq_core.ops import for_array

    class WindowlessView(View):
        def attend(self, q, scale, mask=None, kernel=None):
            if self.win_k is None:
                return View.attend(self, q, scale, mask, kernel)
            a = (0 if self.sink_k is None else self.sink_k.shape[2]) + self.history
            b = a + self.win_k.shape[2]
            if mask is not None:  # drop the window's key columns, keep the rest of the mask aligned
                mask = for_array(mask).concat([mask[..., :a], mask[..., b:]], -1)
            view = copy.copy(self)
            view.win_k = view.win_v = None
            return View.attend(view, q, scale, mask, kernel)

    class WindowlessStore(LayerStore):
        def snapshot(self, new=None):
            view = super().snapshot(new)
            view.__class__ = WindowlessView
            return view

    from tq_core.integrations import hf

    hf.LayerStore = WindowlessStore
    try:
        from tq_core.integrations import mlx_lm
    except ImportError:
        return
    mlx_lm.LayerStore = WindowlessStore


def plant_ppl_without_cache() -> None:
    """Perplexity "through the cache" computed in one forward pass with the cache attached: the
    pass attends to its own full-precision keys and never reads a code."""
    from harness import scoring

    original = scoring.logprobs

    def logprobs(host, m, ids, config, protocol, **kw):
        if config is not None and protocol.mode == "cache":
            protocol = scoring.Protocol(protocol.tokens, protocol.tokens, protocol.mode)
        return original(host, m, ids, config, protocol, **kw)

    scoring.logprobs = logprobs


def plant_mlx_no_rope_theta() -> None:
    """The default model converted without the top-level ``rope_theta`` that mlx-lm reads (it then
    falls back to 10 000 instead of SmolLM2's 100 000). Needs a fresh ``TQ_CACHE_DIR`` (the driver
    gives it one) so the conversion runs."""
    from tq_core import models

    original = models._convert_gguf

    def convert(gguf, out):
        original(gguf, out)
        cfg = models._read_json(out / "config.json")
        cfg.pop("rope_theta", None)
        models._write_json(out / "config.json", cfg)

    models._convert_gguf = convert


DEFECTS = {  # name -> (what is planted, how)
    "decode-returns-originals": ("decode returns the originals (codes stored, never read)", plant_decode_originals),
    "codes-one-byte-per-code": ("codes stored one byte per code", plant_byte_per_code),
    "never-compresses": ("a cache that never compresses but keeps its label", plant_never_compresses),
    "ppl-without-cache": ("perplexity computed without the cache (one pass)", plant_ppl_without_cache),
    "mlx-no-rope-theta": ("the MLX conversion without rope_theta", plant_mlx_no_rope_theta),
    "rotation-seed-differs": ("a rotation seed that differs between encode and decode", plant_rotation_seed),
    "fast-path-ignores-window": ("a fast attention path that ignores the window", plant_window_ignored),
}
NEEDS_FRESH_CONVERSION = {"mlx-no-rope-theta"}
NEEDS_MLX = {"mlx-no-rope-theta"}


# ==== the pytest plugin ===============================================================================
@pytest.hookimpl(trylast=True)  # after conftest's pytest_configure: MLX's BLAS is loaded before mlx is
def pytest_configure(config):
    name = os.environ.get(ENV, "none")
    if name == "none":
        return
    if name not in DEFECTS:
        raise pytest.UsageError(f"{ENV} must be one of none, {', '.join(DEFECTS)}, got {name!r}")
    DEFECTS[name][1]()


def pytest_report_header(config):
    return f"selftest: planted defect: {os.environ.get(ENV, 'none')}"


# ==== the driver ======================================================================================
CONFIG = "K4V2+s4w128"  # the headline config: gated everywhere


def selection(with_mlx: bool) -> tuple[list[str], str]:
    """(suite files, -k expression) of a self-test run."""
    files = ["suites/test_memory.py", "suites/test_attention.py", "suites/test_perplexity.py",
             "suites/test_generation.py"]
    # (-k matches substrings of test ids; it takes no "=")
    parts = [
        "(test_bytes_held and smollm2 and 1024 and torch-cpu and default)",
        "test_attention_per_layer",
        "((test_perplexity_chunked or (test_plain and 64)) and torch-cpu)",
        "(test_golden and story and torch-cpu and K4V2)",
    ]
    if with_mlx:  # the only check of the MLX conversion: MLX's baseline against torch's
        parts.append("test_noise_floor_cross_backend")
    return files, " or ".join(parts)


def _pytest(name: str, targets: str, out: pathlib.Path, extra: list[str]) -> dict:
    files, expr = selection("mlx" in targets)
    xml = out / f"{name}.xml"
    env = {**os.environ, ENV: name}
    if name in NEEDS_FRESH_CONVERSION:
        env["TQ_CACHE_DIR"] = str(out / f"cache-{name}")
    cmd = [sys.executable, "-m", "pytest", *files, "-k", expr, "-p", "harness.selftest", "-p", "no:cacheprovider",
           "--tq-no-results", f"--tq-target={targets}", f"--tq-config={CONFIG}", "-q", "--no-header",
           "-o", "console_output_style=classic", f"--junitxml={xml}", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(r.stdout + r.stderr)
    return {"name": name, "rc": r.returncode, "seconds": time.perf_counter() - t0, "tests": _junit(xml),
            "log": out / f"{name}.log"}


def _junit(path: pathlib.Path) -> list[dict]:
    """[{suite, test, outcome, message}] of a junit xml (missing: [])."""
    if not path.is_file():
        return []
    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        suite = tc.get("classname", "").split(".")[-1]
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                break
        out.append({"suite": suite, "test": tc.get("name", ""), "outcome": outcome, "message": message})
    return out


def _mlx_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("mlx.core") is not None and importlib.util.find_spec("mlx_lm") is not None
    except (ImportError, ValueError):
        return False


def table(control: dict, runs: list[dict]) -> tuple[str, list[str]]:
    """The report: one row per defect, one column per suite (failed tests / tests run); and the
    defects no suite caught."""
    suites = sorted({t["suite"] for r in [control, *runs] for t in r["tests"]})
    short = {s: s.replace("test_", "") for s in suites}
    head = f"{'defect':<26} " + " ".join(f"{short[s]:>11}" for s in suites) + "  caught by"
    lines = [head, "-" * len(head)]
    unseen = []
    for r in [control, *runs]:
        cells, caught = [], []
        for s in suites:
            ts = [t for t in r["tests"] if t["suite"] == s and t["outcome"] != "skipped"]
            bad = [t for t in ts if t["outcome"] in ("failed", "error")]
            cells.append(f"{len(bad)}/{len(ts)} {'X' if bad else '.'}" if ts else "-")
            if bad:
                caught.append(short[s])
        if r is control:
            verdict = "control: " + ("PASS (nothing planted, nothing failed)" if not any(
                t["outcome"] in ("failed", "error") for t in r["tests"]) and r["rc"] == 0 else "FAILED")
        else:
            verdict = ", ".join(caught) if caught else "UNSEEN"
            if not caught:
                unseen.append(r["name"])
        lines.append(f"{r['name']:<26} " + " ".join(f"{c:>11}" for c in cells) + f"  {verdict}")
    lines.append("")
    lines.append("cells: failed/run tests of the suite (X: caught); '-' none ran")
    for r in runs:
        first = next((t for t in r["tests"] if t["outcome"] in ("failed", "error")), None)
        if first:
            lines.append(f"  {r['name']}: {first['suite']}::{first['test']}: {first['message']}")
    return "\n".join(lines), unseen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--defect", action="append", choices=list(DEFECTS), help="run only these defects (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--out", default=None, help="folder for logs and junit files (default: a temp folder)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = p.parse_args(argv)
    mlx = _mlx_present()
    targets = "torch-cpu,mlx" if mlx else "torch-cpu"
    names = [n for n in (args.defect or DEFECTS) if mlx or n not in NEEDS_MLX]
    skipped = [n for n in (args.defect or DEFECTS) if n not in names]
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="tq-selftest-"))
    out.mkdir(parents=True, exist_ok=True)
    files, expr = selection(mlx)
    print(f"selftest: {len(names)} defects + control, targets {targets}, config {CONFIG}\n"
          f"  pytest {' '.join(files)} -k '{expr}'\n  logs: {out}", flush=True)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {n: pool.submit(_pytest, n, targets, out, args.pytest_args) for n in ["none", *names]}
        results = {}
        for n, f in futures.items():
            results[n] = f.result()
            r = results[n]
            bad = sum(t["outcome"] in ("failed", "error") for t in r["tests"])
            print(f"  {n:<26} rc={r['rc']} {len(r['tests'])} tests, {bad} failed/errors, {r['seconds']:.0f} s",
                  flush=True)
    control = results.pop("none")
    control["name"] = "(none: control)"
    report, unseen = table(control, [results[n] for n in names])
    print()
    print(report)
    for n in skipped:
        print(f"  {n}: not run (needs mlx and mlx-lm: pip install 'tq-core[mlx-cpu]')")
    print(f"\nselftest: {time.perf_counter() - t0:.0f} s")
    ok = True
    if control["rc"] != 0 or not control["tests"]:
        print(f"selftest: the control run (nothing planted) failed: see {control['log']}")
        ok = False
    ran = {t["suite"] for t in control["tests"] if t["outcome"] != "skipped"}
    for f in files:
        if pathlib.Path(f).stem not in ran:  # a renamed test would silently shrink what is checked
            print(f"selftest: the selection ran no test of {f} in the control run: update harness/selftest.py")
            ok = False
    if unseen:
        print(f"selftest: defects no suite caught: {', '.join(unseen)}")
        ok = False
    for n in names:
        if not results[n]["tests"]:
            print(f"selftest: {n}: no test ran (rc {results[n]['rc']}): see {results[n]['log']}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
