"""The top of a report: gates from the test outcomes, and the headline numbers per config.

A headline number is one record picked from a suite: the real model's, from the suite's own
protocol rather than a labelled extra (perplexity: decode semantics through the cache, not
``extra=chunk64`` / ``simulated``), at the longest context measured, else the first. It carries
the labels it was measured through and its baseline.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from . import fmt, metrics
from .runs import Run, suite_of
from .tables import TEXT_MAX, show

OUTCOMES = ("passed", "failed", "error", "xfailed", "skipped")
SIZE_LABELS = ("context", "tokens", "length", "chunk")
NOT_VIA = {"config", "config_name", "backend", "spec", "baseline"}


@dataclass
class Cell:
    value: float
    error: float | None
    unit: str
    via: str
    baseline: str
    baseline_labelled: bool
    metric: str = ""

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


HEADLINES = [
    Headline("bits", "Bits / channel held", (("perplexity", r"^bits_per_ch"), ("memory", r"^bits_per_ch")),
             "none: absolute (an fp16 cache holds 16)"),
    Headline("saved", "Memory saved vs fp16", ()),  # computed from memory records, see saved_cell
    Headline("dppl", "ΔPPL", (("perplexity", r"^d_?ppl"),)),
    Headline("kld", "Mean KLD", (("perplexity", r"^kld_mean", r"^kld$", r"^kld"),)),
    Headline("top1", "Same top-1", (("perplexity", r"^same_top_?1", r"^top1_agree"),)),
    Headline("match", "Generation match rate",
             (("generation", r"^match_rate_mean$", r"^match_rate$", r"^token_match"),)),
]


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


def gates(run: Run) -> dict:
    """Outcome counts overall and per suite, the failed node ids, the status (``status``) and, for a
    run that did not end, why and which tests were left unfinished."""
    per_suite: dict[str, Counter] = {}
    for nodeid, outcome in run.tests.items():
        per_suite.setdefault(suite_of(nodeid), Counter())[outcome] += 1
    total = sum(per_suite.values(), Counter())
    failed = sorted(n for n, o in run.tests.items() if o in ("failed", "error"))
    unfinished = run.run.get("unfinished_tests") or []
    return {"status": status(run), "total": {o: total.get(o, 0) for o in OUTCOMES},
            "suites": {s: {o: c.get(o, 0) for o in OUTCOMES} for s, c in sorted(per_suite.items())},
            "failed": failed, "skipped_backends": run.run.get("skipped_backends") or {},
            "incomplete": run.run.get("incomplete"), "exitstatus": run.run.get("exitstatus"),
            "unfinished": [str(t) for t in unfinished] if isinstance(unfinished, list) else [str(unfinished)]}


def via(rec: dict, run_model: str | None) -> str:
    parts = [rec["suite"]]
    for k, v in rec.items():
        if k in ("suite", "test", "metric", "value", "unit", "error") or k in NOT_VIA or v is None or v != v:
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
        row = {f"label.{k}" if k in ("suite", "test", "metric", "value", "unit", "error") else k: v
               for k, v in (r.get("labels") or {}).items()}
        row.update({k: r.get(k) for k in ("suite", "test", "metric", "value", "unit", "error")})
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
                base, labelled, rec["metric"])


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


def headlines(run: Run) -> list[dict]:
    """One row per (config, backend): {"config", "backend", "cells": {headline key: Cell | None}}.

    Pairs come in the order the perplexity suite scored them, then any other, in record order.
    """
    model = run.model
    by_pair: dict[tuple, list[dict]] = {}
    recs = flat(run)
    for r in sorted(recs, key=lambda r: r["suite"] != "perplexity"):  # stable: perplexity's pairs first
        if r.get("config") is not None:
            by_pair.setdefault((r["config"], r.get("backend")), [])
    for r in recs:
        if r.get("config") is not None:
            by_pair[(r["config"], r.get("backend"))].append(r)
    rows = []
    for (config, backend), sub in by_pair.items():
        cells = {}
        for h in HEADLINES:
            if h.key == "saved":
                cells[h.key] = saved_cell(sub, model)
                continue
            cells[h.key] = None
            for suite, *patterns in h.patterns:
                rec = pick(find(sub, *patterns, suite=suite), model)
                if rec is not None:
                    cells[h.key] = _cell(rec, model)
                    if h.baseline:
                        cells[h.key].baseline, cells[h.key].baseline_labelled = h.baseline, True
                    break
        if any(cells.values()):
            rows.append({"config": config, "backend": backend, "cells": cells})
    return rows
