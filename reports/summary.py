"""The top of a report: gates from the test outcomes, and the headline table, one row per config.

A headline number is one record picked from a suite: the real model's, from the suite's own
protocol rather than a labelled extra (perplexity: decode semantics through the cache, not
``extra=chunk64`` / ``simulated``), at the longest context measured, else the first. It carries
the labels it was measured through and its baseline.

One table holds one protocol: the perplexity columns of every row (every backend) come from the
same tokens, chunk and mode, the one most rows were scored with; a row scored only otherwise shows
no number there and says which protocol it has (the full report has it). Bits held are shown at
the measured context and projected to 4k and 32k tokens from the bytes the cache held per part:
the sinks and window are a fixed cost, codes and norms grow per encoded token.

Gates: a suite's gate for a config is FAIL when one of its tests failed, UNCALIBRATED when the
suite recorded ``gate_calibrated`` = 0 for it (only the model-independent checks ran: no measured
band exists for that config, protocol and model), MEASURED for another project's cache (the run's
``peers``: measured beside TurboQuant, never gated), else PASS.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from . import fmt, metrics
from .runs import Run, suite_of
from .tables import TEXT_MAX, show

OUTCOMES = ("passed", "failed", "error", "xfailed", "skipped")
SIZE_LABELS = ("context", "tokens", "length", "chunk")
NOT_VIA = {"config", "config_name", "backend", "spec", "baseline", "sinks", "window"}  # sinks, window: in the label
PROTOCOL = ("tokens", "chunk", "mode")  # what the perplexity columns of one table share
PROJECT_TO = (4096, 32768)
CORE = ("suite", "test", "metric", "value", "unit", "error")


@dataclass
class Cell:
    value: float
    error: float | None
    unit: str
    via: str
    baseline: str
    baseline_labelled: bool
    metric: str = ""
    rec: dict | None = None  # the record it stands for (flat: labels merged), for its series key
    note: str = ""  # e.g. "from run <file>"

    @property
    def text(self) -> str:
        if self.unit == "%":
            return fmt.pm(self.value, self.error) + "%"
        if self.unit == "bit":
            return fmt.pm(self.value, self.error) + " bit"
        return fmt.with_unit(self.value, self.error, self.unit)


@dataclass
class Headline:
    key: str
    title: str
    patterns: tuple  # ((suite, regex, ...), ...) tried in order
    baseline: str | None = None  # fixed baseline text for absolute quantities
    where: dict | None = None  # labels a candidate record must have (e.g. phase=decode)


HEADLINES = [
    Headline("bits", "Bits / channel held", (("perplexity", r"^bits_per_ch"), ("memory", r"^bits_per_ch")),
             "none: absolute (an fp16 cache holds 16)"),
    Headline("bits4k", "Bits held at 4k (projected)", (), "none: absolute (an fp16 cache holds 16)"),
    Headline("bits32k", "Bits held at 32k (projected)", (), "none: absolute (an fp16 cache holds 16)"),
    Headline("saved", "Memory saved vs fp16", ()),  # computed from memory records, see saved_cell
    Headline("dppl", "ΔPPL", (("perplexity", r"^d_?ppl"),)),
    Headline("kld", "Mean KLD", (("perplexity", r"^kld_mean", r"^kld$", r"^kld"),)),
    Headline("top1", "Same top-1", (("perplexity", r"^same_top_?1", r"^top1_agree"),)),
    Headline("needle", "Needle retrieved", (("needle", r"^accuracy$"),), where={"length": (None,)}),
    Headline("match", "Generation match rate",
             (("generation", r"^match_rate_mean$", r"^match_rate$", r"^token_match"),)),
    Headline("speed", "Decode speed vs baseline", (("speed", r"^speed_ratio$"),
                                                    ("speed_attention", r"^attention_speedup$")),
             where={"phase": ("decode", None)}),
]
PERPLEXITY_KEYS = ("bits", "bits4k", "bits32k", "dppl", "kld", "top1")


# ---- gates -------------------------------------------------------------------------------------
def status(run: Run) -> str:
    """INCOMPLETE (the run did not end: interrupted, killed), FAIL (a test failed, or the session exited
    with a failing status), NO TESTS, else PASS. An incomplete run is never shown as PASS."""
    if run.run.get("incomplete"):
        return "INCOMPLETE"
    if any(o in ("failed", "error") for o in run.tests.values()):
        return "FAIL"
    if run.run.get("exitstatus") not in (None, 0, 5):  # 5: no tests collected
        return "FAIL"
    return "PASS" if run.tests else "NO TESTS"


_CONFIG_IN_ID = re.compile(r"[\[-]config=(.+?)(?=-[A-Za-z_]+=|\]$)")


def _test_configs(run: Run) -> dict[str, set]:
    """Per test id, the (config, backend) pairs its records carry; from the id where it recorded nothing."""
    out: dict[str, set] = {}
    for r in run.records:
        lab = r.get("labels") or {}
        if lab.get("config") is not None:
            out.setdefault(r["test"], set()).add((str(lab["config"]), lab.get("backend")))
    for t in run.tests:
        if t not in out:
            m = _CONFIG_IN_ID.search(t)
            b = re.search(r"[\[-]backend=(.+?)(?=-[A-Za-z_]+=|\]$)", t)
            if m:
                out[t] = {(m.group(1), b.group(1) if b else None)}
    return out


def gate_status(run: Run) -> dict[tuple, str]:
    """(suite, config, backend) -> PASS | FAIL | UNCALIBRATED | MEASURED for every config a suite gated
    or tested (MEASURED: a peer's config, ``run["peers"]``).

    UNCALIBRATED: a ``gate_calibrated`` = 0 record of that suite and config (and no failed test);
    config None: a gate not keyed by config (e.g. the norm-correction check). In a run that did not
    end, a gate whose tests passed so far is INCOMPLETE, never PASS."""
    out: dict[tuple, str] = {}
    per_test = _test_configs(run)
    for t, outcome in run.tests.items():
        for config, backend in per_test.get(t, ()):
            key = (suite_of(t), config, backend)
            if outcome in ("failed", "error"):
                out[key] = "FAIL"
            elif outcome == "passed" and key not in out:
                out[key] = "PASS"
    for r in run.records:
        if r["metric"] != "gate_calibrated":
            continue
        lab = r.get("labels") or {}
        key = (r["suite"], None if lab.get("config") is None else str(lab["config"]), lab.get("backend"))
        if out.get(key) == "FAIL":
            continue
        if r["value"] == 0:
            out[key] = "UNCALIBRATED"
        else:
            out.setdefault(key, "PASS")
    if run.run.get("incomplete"):
        out = {k: "INCOMPLETE" if v == "PASS" else v for k, v in out.items()}
    # Other projects' caches (the run's ``peers``) are measured, never gated: what their tests passed
    # is that a measurement was made, not a quality gate (a failed test still reads FAIL).
    peers = set(run.run.get("peers") or ())
    return {k: "MEASURED" if k[1] in peers and v != "FAIL" else v for k, v in out.items()}


def gates(run: Run) -> dict:
    """Outcome counts overall and per suite, the failed node ids, the status (``status``), the gates
    recorded as uncalibrated (per suite: config, backend, model) and, for a run that did not end, why
    and which tests were left unfinished."""
    per_suite: dict[str, Counter] = {}
    for nodeid, outcome in run.tests.items():
        per_suite.setdefault(suite_of(nodeid), Counter())[outcome] += 1
    total = sum(per_suite.values(), Counter())
    failed = sorted(n for n, o in run.tests.items() if o in ("failed", "error"))
    unfinished = run.run.get("unfinished_tests") or []
    gs = gate_status(run)
    uncal: dict[str, list] = {}
    models: dict[tuple, list] = {}
    for r in run.records:
        if r["metric"] == "gate_calibrated" and r["value"] == 0:
            lab = r.get("labels") or {}
            key = (r["suite"], None if lab.get("config") is None else str(lab["config"]), lab.get("backend"))
            if lab.get("model") is not None and lab["model"] not in models.setdefault(key, []):
                models[key].append(lab["model"])
    for (suite, config, backend), s in sorted(gs.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if s == "UNCALIBRATED":
            uncal.setdefault(suite, []).append({"config": config or "all configs", "backend": backend,
                                                "model": ", ".join(models.get((suite, config, backend), [])) or None})
    suite_state = {}
    for s in set(per_suite) | set(uncal):
        c = per_suite.get(s, Counter())
        suite_state[s] = "FAIL" if c.get("failed") or c.get("error") else "UNCALIBRATED" if uncal.get(s) else \
            ("INCOMPLETE" if run.run.get("incomplete") else "PASS") if c.get("passed") else "NO TESTS"
    return {"status": status(run), "total": {o: total.get(o, 0) for o in OUTCOMES},
            "suites": {s: {o: c.get(o, 0) for o in OUTCOMES} for s, c in sorted(per_suite.items())},
            "suite_status": dict(sorted(suite_state.items())), "uncalibrated": uncal,
            "n_uncalibrated": sum(len(v) for v in uncal.values()),
            "failed": failed, "skipped_backends": run.run.get("skipped_backends") or {},
            "incomplete": run.run.get("incomplete"), "exitstatus": run.run.get("exitstatus"),
            "unfinished": [str(t) for t in unfinished] if isinstance(unfinished, list) else [str(unfinished)],
            "speed": run.run.get("speed")}


# ---- picking records ---------------------------------------------------------------------------
def via(rec: dict, run_model: str | None) -> str:
    parts = [rec["suite"]]
    for k, v in rec.items():
        if k in CORE or k in NOT_VIA or v is None or v != v:
            continue
        if isinstance(v, str) and len(v) > TEXT_MAX or (k == "model" and v == run_model):
            continue
        parts.append(f"{k}={show(v)}")
    return " · ".join(parts)


def baseline_of(rec: dict) -> tuple[str, bool]:
    b = rec.get("baseline")
    if b is not None and b == b:
        return str(b), True
    return metrics.DEFAULT_BASELINE.get(rec["suite"], "not recorded"), False


def flat(run: Run) -> list[dict]:
    """Records with their labels merged in (as in the frame), for fast plain-Python selection."""
    out = []
    for r in run.records:
        row = {f"label.{k}" if k in CORE else k: v for k, v in (r.get("labels") or {}).items()}
        row.update({k: r.get(k) for k in CORE})
        out.append(row)
    return out


def find(recs: list[dict], *patterns: str, suite: str | None = None) -> list[dict]:
    """Records whose metric matches the first pattern that matches any (as ``metrics.match``)."""
    recs = [r for r in recs if suite is None or r["suite"] == suite]
    for p in patterns:
        rx = re.compile(p, re.I)
        hit = [r for r in recs if rx.match(str(r["metric"]))]
        if hit:
            return hit
    return []


def pick(cands: list[dict], run_model: str | None) -> dict | None:
    """The record that stands for a config: the run's real model, no ``extra`` label (a protocol
    extra) and mode ``cache`` where there is one, the longest context, else the first."""
    if not cands:
        return None
    if run_model and any(r.get("model") == run_model for r in cands):
        cands = [r for r in cands if r.get("model") == run_model]
    if any(r.get("extra") is None for r in cands):
        cands = [r for r in cands if r.get("extra") is None]
    if any(r.get("mode") == "cache" for r in cands):
        cands = [r for r in cands if r.get("mode") in ("cache", None)]
    if any(r.get("batch") == 1 for r in cands):  # decode speed: one sequence, as a user decodes
        cands = [r for r in cands if r.get("batch") in (1, None)]
    if any(r.get("chunk") == 1 for r in cands):  # decode semantics: each token attends to the compressed history
        cands = [r for r in cands if r.get("chunk") in (1, None)]
    for size in SIZE_LABELS:
        sizes = [r.get(size) for r in cands]
        if any(v is not None for v in sizes):
            nums = [v for v in sizes if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if nums:
                cands = [r for r in cands if r.get(size) == max(nums)]
            break
    return cands[0]


def _cell(rec: dict | None, run_model) -> Cell | None:
    if rec is None:
        return None
    base, labelled = baseline_of(rec)
    err = rec["error"]
    return Cell(rec["value"], None if err is None or err != err else err, rec["unit"] or "", via(rec, run_model),
                base, labelled, rec["metric"], rec)


def saved_cell(recs: list[dict], run_model) -> Cell | None:
    """1 - bytes held / bytes of the measured fp16 cache, from the same test."""
    rec = pick(find(recs, r"^bytes_held", suite="memory"), run_model)
    if rec is None:
        return None
    same = [r for r in find(recs, r"^bytes_fp16", r"^bytes_base", suite="memory") if r["test"] == rec["test"]]
    if same:
        frac, against = 1 - rec["value"] / same[0]["value"], None
    else:
        ratio = find([r for r in recs if r["test"] == rec["test"]], r"^ratio_vs_fp16")
        if not ratio:
            return None
        frac, against = 1 - ratio[0]["value"], "fp16 cache by formula (ratio_vs_fp16)"
    c = _cell({**rec, "value": 100 * frac, "error": None, "unit": "%"}, run_model)
    c.metric = ""  # computed: 1 - bytes_held / bytes of the fp16 cache
    if against:
        c.baseline, c.baseline_labelled = against, False
    return c


def needle_cell(recs: list[dict], run_model) -> Cell | None:
    """Fraction of needle cases retrieved, from the per-case ``passkey_found`` records where the suite
    recorded no ``accuracy`` summary."""
    found = [r for r in find(recs, r"^passkey_found$", suite="needle")
             if not run_model or r.get("model") in (None, run_model)]
    if not found:
        return None
    rec = found[0]
    lengths = sorted({r.get("length") for r in found if isinstance(r.get("length"), (int, float))})
    span = f" · lengths {fmt.num(lengths[0])}–{fmt.num(lengths[-1])}" if len(lengths) > 1 else ""
    c = _cell({**rec, "metric": "passkey_found", "value": sum(r["value"] for r in found) / len(found), "error": None},
              run_model)
    c.via = f"needle · passkey_found, mean of {len(found)} cases{span}"
    return c


def projected_bits(recs: list[dict], bits: dict, tokens: int) -> float | None:
    """Bits per channel the cache of ``bits``'s test would hold at ``tokens``: the sinks and window
    (and any other part) as the fixed bytes measured, codes and norms at the measured bytes per
    encoded token. None without the per-part records of that test (or with nothing encoded), and
    when the cache kept some layers uncompressed (sliding-window layers grow up to a window these
    records do not state, then stay fixed: no honest projection)."""
    same = {r["metric"]: r["value"] for r in recs if r["test"] == bits["test"] and r["suite"] == bits["suite"]
            and all(show(r.get(k)) == show(bits.get(k)) for k in ("config", "backend", "model", "tokens", "chunk"))}
    need = ("bytes_codes", "tokens_held", "tokens_encoded")
    if any(k not in same for k in need) or not same["tokens_encoded"] or not same["tokens_held"]:
        return None
    if same.get("bytes_uncompressed", 0.0) > 0:
        return None
    # Fixed: sinks, window, a peer's residual window (at most its length); per encoded token: codes and
    # what rides with them (TurboQuant's norms, a peer's scales and zero points).
    fixed = sum(same.get(f"bytes_{p}", 0.0) for p in ("sinks", "window", "other", "residual"))
    encoded = sum(same.get(f"bytes_{p}", 0.0) for p in ("codes", "norms", "scales", "zeros"))
    per_token = encoded / same["tokens_encoded"]
    held = same.get("bytes_held", fixed + encoded)
    n_fixed = same["tokens_held"] - same["tokens_encoded"]
    if tokens < n_fixed or held <= 0:
        return None
    at = fixed + per_token * (tokens - n_fixed)
    return bits["value"] * (at / tokens) / (held / same["tokens_held"])


def _protocol(rec: dict | None) -> tuple:
    return tuple(show(rec.get(k)) for k in PROTOCOL) if rec else ()


def protocol_text(proto: tuple) -> str:
    return " · ".join(f"{k}={v}" for k, v in zip(PROTOCOL, proto) if v != fmt.DASH)


def table_protocol(by_pair: dict, model) -> tuple:
    """The perplexity protocol of one headline table: the one most (config, backend) pairs were scored
    with by the suite's own protocol (no ``extra`` label, mode cache), else by their headline record;
    ties go to the first pair (the perplexity suite's order)."""
    own, picked = Counter(), Counter()
    for sub in by_pair.values():
        kld = find(sub, r"^kld_mean", r"^d_?ppl", suite="perplexity")
        mine = [r for r in kld if r.get("extra") is None and r.get("mode") in ("cache", None)]
        for p in dict.fromkeys(_protocol(r) for r in mine):
            own[p] += 1
        rec = pick(kld, model)
        if rec is not None:
            picked[_protocol(rec)] += 1
    counts = own or picked
    return counts.most_common(1)[0][0] if counts else ()


def _wants(h: Headline, rec: dict) -> bool:
    return all(rec.get(k) in ok or (rec.get(k) != rec.get(k) and None in ok) for k, ok in (h.where or {}).items())


@dataclass
class HeadlineTable:
    rows: list  # [{"config", "backend", "cells": {key: Cell | None}, "gates": {suite: status}, "note": str}]
    protocol: str = ""  # the perplexity protocol every row shares
    facts: list = field(default_factory=list)  # [(name, value)] stated once above the table
    vias: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    meanings: dict = field(default_factory=dict)
    speed_note: str = ""  # why the speed column is empty, where it is
    unlabelled_baselines: bool = False
    columns: list = field(default_factory=list)  # the HEADLINES with a value in some row (or a speed note)

    def __bool__(self):
        return bool(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def headlines(run: Run, speed_from: list[Run] | None = None) -> list[dict]:
    """One row per (config, backend): {"config", "backend", "cells": {headline key: Cell | None},
    "gates": {suite: PASS | FAIL | UNCALIBRATED}, "note"}. ``speed_from``: runs of the same commit
    whose speed records fill the speed column where this run timed nothing (the serial speed pass).

    Pairs come in the order of the run's configs (``run.configs``: the tier's headline default first),
    then any other in the order the perplexity suite scored them, then in record order; the baseline
    last.
    """
    model = run.model
    recs = flat(run)
    by_pair: dict[tuple, list[dict]] = {}
    for r in sorted(recs, key=lambda r: r["suite"] != "perplexity"):  # stable: perplexity's pairs first
        if r.get("config") is not None:
            by_pair.setdefault((r["config"], r.get("backend")), [])
    for r in recs:
        if r.get("config") is not None:
            by_pair[(r["config"], r.get("backend"))].append(r)
    extra_speed: dict[tuple, list] = {}
    for other in speed_from or []:
        for r in flat(other):
            if r["suite"] in ("speed", "speed_attention") and r.get("config") is not None:
                extra_speed.setdefault((r["config"], r.get("backend")), []).append((other, r))
    proto = table_protocol(by_pair, model)
    gs = gate_status(run)
    rows = []
    for (config, backend), sub in by_pair.items():
        cells, note = {}, ""
        ppl = [r for r in sub if r["suite"] == "perplexity"]
        same = [r for r in ppl if _protocol(r) == proto]
        if ppl and proto and not same:
            others = Counter(protocol_text(_protocol(r)) for r in ppl if r["metric"] in ("kld_mean", "dppl_pct"))
            if others:
                note = f"perplexity only at {', '.join(others)}: not this table's protocol (see the full report)"
        scope = [r for r in sub if r["suite"] != "perplexity"] + same
        for h in HEADLINES:
            cells[h.key] = None
            if h.key == "saved":
                cells[h.key] = saved_cell(sub, model)
                continue
            if h.key in ("bits4k", "bits32k"):
                continue
            for suite, *patterns in h.patterns:
                rec = pick([r for r in find(scope, *patterns, suite=suite) if _wants(h, r)], model)
                if rec is not None:
                    cells[h.key] = _cell(rec, model)
                    if h.baseline:
                        cells[h.key].baseline, cells[h.key].baseline_labelled = h.baseline, True
                    break
        if cells["needle"] is None:
            cells["needle"] = needle_cell(sub, model)
        if cells["speed"] is None and (config, backend) in extra_speed:
            srcs = extra_speed[(config, backend)]
            for suite, *patterns in HEADLINES[-1].patterns:
                cand = [r for _, r in srcs if r["suite"] == suite and _wants(HEADLINES[-1], r)]
                rec = pick(find(cand, *patterns), model)
                if rec is not None:
                    src = next(o for o, r in srcs if r is rec)
                    c = _cell(rec, model)
                    c.note = f"from {src.path.name} (same commit)"
                    c.via = f"{c.via} · run {src.path.stem}"
                    cells["speed"] = c
                    break
        b = cells["bits"]
        if b is not None and b.rec is not None and b.rec["suite"] == "perplexity":
            for key, tokens in zip(("bits4k", "bits32k"), PROJECT_TO):
                v = projected_bits(sub, b.rec, tokens)
                if v is not None:
                    cells[key] = Cell(v, None, "bit", f"projected from {b.via}", b.baseline, True, "", b.rec,
                                      note="projected")
        g = {s: st for (s, c, bk), st in gs.items() if c == str(config) and bk in (backend, None)}
        if any(cells.values()) or note:
            rows.append({"config": config, "backend": backend, "cells": cells, "gates": dict(sorted(g.items())),
                         "note": note})
    # The run's own configs first, in its order (the tier's headline default leads), then any other,
    # the baseline last.
    order = {c: i for i, c in enumerate(run.run.get("configs") or [])}
    rows.sort(key=lambda r: (metrics.is_baseline_config(r["config"]), order.get(str(r["config"]), len(order))))
    return rows


def table(run: Run, speed_from: list[Run] | None = None) -> HeadlineTable:
    """The headline table of a run: its rows, the protocol and facts stated once, per column the most
    common measured-through line, its baselines and meanings."""
    rows = headlines(run, speed_from)
    t = HeadlineTable(rows)
    protos = Counter(_protocol(c.rec) for r in rows for k in ("kld", "dppl") if (c := r["cells"][k]) and c.rec)
    t.protocol = protocol_text(protos.most_common(1)[0][0]) if protos else ""
    corpus = run.run.get("corpus") if isinstance(run.run.get("corpus"), dict) else {}
    if protos:  # the protocol is stated once above the table, not in every column's via
        said = {f"{k}={v}" for k, v in zip(PROTOCOL, protos.most_common(1)[0][0])}
        for r in rows:
            for c in r["cells"].values():
                if c is not None and c.rec is not None and c.rec.get("suite") == "perplexity":
                    c.via = " · ".join(part for part in c.via.split(" · ") if part not in said)
    t.facts = [(k, v) for k, v in (("tier", run.run.get("tier")), ("model", run.model),
                                   ("corpus sha256", (corpus.get("sha256") or "")[:12] or None),
                                   ("perplexity", t.protocol or None)) if v]
    for h in HEADLINES:
        cs = [c for r in rows if (c := r["cells"][h.key])]
        vias = [c.via for c in cs]
        t.vias[h.key] = max(dict.fromkeys(vias), key=vias.count) if vias else fmt.DASH
        seen = dict.fromkeys(c.baseline + ("" if c.baseline_labelled else " †") for c in cs)
        t.baselines[h.key] = "; ".join(seen) or fmt.DASH
        names = dict.fromkeys(c.metric for c in cs)
        t.meanings[h.key] = "; ".join(f"{m}: {metrics.meaning(m)}" if m else MEANINGS.get(h.key, "") for m in names) \
            or fmt.DASH
    t.unlabelled_baselines = any(not c.baseline_labelled for r in rows for c in r["cells"].values() if c)
    speed = run.run.get("speed")
    if speed and not any(r["cells"]["speed"] for r in rows):
        t.speed_note = str(speed)
    t.columns = [h for h in HEADLINES if any(r["cells"][h.key] for r in rows) or (h.key == "speed" and t.speed_note)]
    return t


SAVED_MEANING = ("1 − bytes_held / bytes_fp16_cache of the same memory test: the share of an fp16 cache's bytes "
                 "the compressed cache does not hold (higher is better)")
MEANINGS = {"saved": SAVED_MEANING,
            "bits4k": "bits per channel projected to 4 096 tokens from the bytes held per part: sinks and window "
                      "fixed, codes and norms per encoded token (lower is better)",
            "bits32k": "bits per channel projected to 32 768 tokens from the bytes held per part: sinks and window "
                       "fixed, codes and norms per encoded token (lower is better)"}
