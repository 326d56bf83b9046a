"""A small real results file: a cheap subset of the suites, measured for real in a subprocess.

    python -m reports.sample OUT_DIR     # then: python -m reports.render --target cpu --results OUT_DIR

For the report's tests (records made by the suites' own code, so the report is tested on the names,
units and labels the suites really write) and to preview pages from real records. The subset takes
seconds on a CPU: one memory fill, random-vector MSE at two bit widths, codec throughput (encode and
decode) and one cache-level decode timing. It is picked by this module acting as a pytest plugin
(``-p reports.sample`` with ``TQ_SAMPLE=1``) from what the suites collect, preferring the cheapest
parametrization, so it follows the suites' parameters instead of naming test ids.

Imports neither torch nor mlx itself (the suites run in the subprocess), and nothing but the standard
library where the subprocess loads it as a plugin.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

from . import stream

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (suite file, test function, id parts preferred (the cheapest), how many items)
SUBSET = [
    ("suites/test_memory.py", "test_bytes_held", ("context=1024", "smollm2", "variant=default"), 1),
    ("suites/test_mse.py", "test_random_unit_vectors", ("dim=64",), 2),
    ("suites/test_speed.py", "test_codec_throughput", ("d=64", "bits=4"), 2),
    ("suites/test_speed.py", "test_cache_decode_tokens_per_s", ("context=1024", "layers=2"), 1),
]


def pytest_collection_modifyitems(config, items):
    """With ``TQ_SAMPLE=1``: keep only ``SUBSET`` (per test function, the items with the most preferred parts)."""
    if os.environ.get("TQ_SAMPLE") != "1":
        return
    keep = []
    for path, func, prefer, n in SUBSET:
        cands = [i for i in items if i.nodeid.startswith(f"{path}::{func}[") or i.nodeid == f"{path}::{func}"]
        cands.sort(key=lambda i: -sum(p in i.nodeid for p in prefer))  # stable: collection order otherwise
        keep += cands[:n]
    dropped = [i for i in items if i not in keep]
    items[:] = [i for i in items if i in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)


def run(results: str | os.PathLike, target: str = "cpu", timeout: float = 900) -> pathlib.Path:
    """Measure the subset into ``results/<target>/`` (once: an existing results file there is reused).

    Returns the results file; ``RuntimeError`` with the end of pytest's output when the run fails.
    """
    from . import runs  # pandas: not for the plugin side of this module

    results = pathlib.Path(results)
    stream.check_target(target)
    have = runs.files(results, target) if (results / target).is_dir() else []
    if have:
        return have[-1]
    files = list(dict.fromkeys(path for path, *_ in SUBSET))
    env = {**os.environ, "TQ_RESULTS_DIR": str(results), "TQ_RESULTS_TARGET": target, "TQ_SAMPLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-p", "reports.sample", "-p", "no:cacheprovider",
                           "-q", "--tq-target=torch-cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    have = runs.files(results, target) if (results / target).is_dir() else []
    if proc.returncode != 0 or not have:
        raise RuntimeError(f"the sample run failed (exit status {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-2000:]}")
    return have[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.sample", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--target", default="cpu")
    args = p.parse_args(argv)
    try:
        print(run(args.out, args.target))
    except (RuntimeError, ValueError) as e:
        print(f"reports.sample: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
