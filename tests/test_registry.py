"""The metric registry (reports/registry.py) against what the suites record, read from their source.

Every ``record("<name>", ...)`` in suites/*.py (and harness/*.py) must name a registered metric with the registered
unit; names built in a loop over literal tuples or with f-strings are expanded or matched; and
every registered metric must be recorded somewhere. So a metric added, renamed or dropped on
either side fails here, not in a report that silently loses it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reports import registry

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "suites").glob("*.py")) + sorted((ROOT / "harness").glob("*.py"))  # harness/timing.py records too


@dataclass
class Call:
    where: str
    name: str | None  # a literal (or loop-expanded) metric name
    pattern: str | None  # an f-string name as a regex (``{...}`` -> ``.+``)
    unit: str | None  # the literal unit passed, if any


def _const_strings(node) -> list[str] | None:
    """The strings of a literal tuple/list of strings, else None."""
    if isinstance(node, (ast.Tuple, ast.List)) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _loop_values(loop: ast.For, module_consts: dict) -> dict[str, list[str]]:
    """{loop variable: its string values} for ``for m in ("a", "b")`` / ``for m, x in (("a", 1), ...)``."""
    it = loop.iter
    if isinstance(it, ast.Name) and it.id in module_consts:
        it = module_consts[it.id]
    out: dict[str, list[str]] = {}
    if isinstance(loop.target, ast.Name):
        vals = _const_strings(it)
        if vals is not None:
            out[loop.target.id] = vals
    elif isinstance(loop.target, ast.Tuple) and isinstance(it, (ast.Tuple, ast.List)):
        for pos, t in enumerate(loop.target.elts):
            if not isinstance(t, ast.Name):
                continue
            vals = []
            for e in it.elts:
                if (isinstance(e, ast.Tuple) and pos < len(e.elts) and isinstance(e.elts[pos], ast.Constant)
                        and isinstance(e.elts[pos].value, str)):
                    vals.append(e.elts[pos].value)
            if vals and len(vals) == len(it.elts):
                out[t.id] = vals
    return out


def _fstring(node: ast.JoinedStr, env: dict) -> tuple[list[str], str]:
    """(names when every placeholder is a loop variable with known values, else [], the name as a regex)."""
    names: list[str] | None = [""]
    rx = ""
    for part in node.values:
        if isinstance(part, ast.Constant):
            rx += re.escape(part.value)
            names = None if names is None else [n + part.value for n in names]
            continue
        rx += ".+"
        v = part.value
        vals = env.get(v.id) if isinstance(v, ast.Name) and part.format_spec is None else None
        names = None if names is None or vals is None else [n + x for n in names for x in vals]
    return names or [], rx


def record_calls(path: Path) -> list[Call]:
    tree = ast.parse(path.read_text(), str(path))
    consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and _const_strings(node.value) is not None}
    calls: list[Call] = []

    def visit(node, env):
        if isinstance(node, ast.For):
            env = {**env, **_loop_values(node, consts)}
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "record"
                and node.args):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            unit = None
            if len(node.args) >= 3 and isinstance(node.args[2], ast.Constant):
                unit = node.args[2].value
            for kw in node.keywords:
                if kw.arg == "unit" and isinstance(kw.value, ast.Constant):
                    unit = kw.value.value
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                calls.append(Call(where, first.value, None, unit))
            elif isinstance(first, ast.JoinedStr):
                names, rx = _fstring(first, env)
                calls.extend([Call(where, n, None, unit) for n in names] or [Call(where, None, rx, unit)])
            elif isinstance(first, ast.Name) and first.id in env:
                calls.extend(Call(where, n, None, unit) for n in env[first.id])
        for child in ast.iter_child_nodes(node):
            visit(child, env)

    visit(tree, {})
    return calls


CALLS = [c for p in SUITES for c in record_calls(p)]


def test_the_suites_record_through_record_calls_this_test_can_read():
    assert len(CALLS) > 100 and {c.where.split(":")[0] for c in CALLS} >= {
        "suites/test_memory.py", "suites/test_mse.py", "suites/test_speed.py"}


@pytest.mark.parametrize("call", [c for c in CALLS if c.name], ids=lambda c: f"{c.name}@{c.where}")
def test_every_metric_the_suites_record_is_registered_with_its_unit(call):
    m = registry.lookup(call.name)  # UnknownMetric: add it to reports/registry.py
    if call.unit is not None:
        assert call.unit == m.unit, f"{call.where}: {call.name} recorded in {call.unit!r}, registered {m.unit!r}"


@pytest.mark.parametrize("call", [c for c in CALLS if c.pattern], ids=lambda c: c.where)
def test_every_name_built_at_run_time_matches_registered_metrics(call):
    hits = [m for m in registry.METRICS.values() if re.fullmatch(call.pattern, m.name)]
    assert hits, f"{call.where}: no registered metric matches {call.pattern!r}"
    if call.unit is not None:
        assert {m.unit for m in hits} == {call.unit}, (call.where, {m.name: m.unit for m in hits})


def test_every_registered_metric_is_recorded_by_a_suite():
    """A name only the registry still has (the suite renamed or dropped it) is stale."""
    literal = {c.name for c in CALLS if c.name}
    patterns = [c.pattern for c in CALLS if c.pattern]
    source = "\n".join(p.read_text() for p in SUITES)
    # a name held in a suite's own table (e.g. speed's {"vectors_per_s": ...} rates) counts when quoted there
    stale = [n for n in registry.METRICS if n not in literal and not any(re.fullmatch(p, n) for p in patterns)
             and f'"{n}"' not in source]
    assert not stale, f"registered in {registry.FILE} but recorded by no suite: {stale}"


def test_unknown_metric_is_one_clear_line():
    with pytest.raises(KeyError) as e:
        registry.lookup("no_such_metric")
    assert str(e.value) == ("metric 'no_such_metric' is not in reports/registry.py: add it with its unit, "
                            "direction and meaning")
    assert registry.get("no_such_metric") is None and registry.get(None) is None
    with pytest.raises(registry.UnitMismatch, match="recorded with unit 'B', registered with 'nats'"):
        registry.unit_of("kld_mean", "B")
    assert registry.unit_of("kld_mean") == "nats"


def test_every_metric_has_a_direction_unit_and_one_line_meaning():
    for name, m in registry.METRICS.items():
        assert m.name == name and m.direction in registry.DIRECTIONS and isinstance(m.unit, str)
        assert m.meaning and "\n" not in m.meaning and len(m.meaning) < 200, name
    with pytest.raises(ValueError, match="direction"):
        registry.Metric("x", "", "up", "x")


@pytest.mark.parametrize("name, direction", [
    ("layers_nc_on_better_kl_mean", "higher"),  # the old name-matching said lower ("kl")
    ("layers_nc_on_better_rel_err_mean", "higher"),
    ("attn_kl_mean_nc_on_minus_off", "lower"),
    ("attn_cos_mean_nc_on_minus_off", "higher"),
    ("kld_mean", "lower"), ("same_top1_pct", "higher"), ("first_divergence", "higher"),
    ("bytes_held", "lower"), ("bytes_fp16_cache", "none"), ("tokens_held", "none"),
    ("d_mse_vs_optimum", "target"), ("cross_dppl_pct", "target"),
    ("host_load_1m", "none"), ("mlx_gemm_gflops", "none"), ("vectors_per_s", "higher"),
    ("decode_overhead_ms_per_layer", "lower"), ("lost_vs_baseline", "lower"),
])
def test_directions(name, direction):
    assert registry.lookup(name).direction == direction


def test_rates_are_the_code_under_tests_throughputs_only():
    rates = {n for n, m in registry.METRICS.items() if m.is_rate}
    assert rates == {"vectors_per_s", "gb_per_s", "out_gb_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                     "attention_gb_per_s_held"}


def test_the_plugin_side_imports_no_third_party_package():
    """The plugin (reports.collect, with the registry and the stream) is loaded in every pytest run,
    reports.sample in the suites' subprocess: nothing beyond pytest and the standard library."""
    code = ("import sys; import reports.collect, reports.sample; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pandas', 'numpy', 'torch', 'mlx', 'jinja2')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
