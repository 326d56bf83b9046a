"""Series of one measurement across runs, and regression detection with a noise model.

**Series.** A series is one measurement under everything that changes its answer (``Key``): target,
suite, metric, the model and its weights hash, the corpus sha256, the device (GPU name for CUDA,
CPU name otherwise, plus MLX's BLAS), the tier, and every input label of the record (config,
backend, tokens, chunk, mode, sinks, window, context, batch, threads, ...). Points with different
keys never share a line or a comparison; labels that are outputs of the test (a needle answer, a
generated text, ``diverged``, a label named like a registered metric) are not part of the key.

**Regressions** are changes of *code* beyond the noise, as benchmark trackers (asv) judge them:

* runs of one commit are never compared with each other; they estimate the noise;
* a commit's value (the median of its runs) is compared with the reference: the median of the last
  ``Noise.window`` runs of earlier commits in the same series;
* the noise of that difference is what the runs themselves show: the scatter of the history (MAD
  of at least ``Noise.min_points`` earlier runs, and of repeated runs of one commit) and, for timed
  tests, the spread of the rounds pytest-benchmark timed (half their range, ``run.timings``: a
  neighbour loading the machine during the run widens it), the larger of the two, × ``k``;
* until a series has runs enough to show its scatter, a recorded standard error stands in for it
  (quality metrics: KLD, ΔPPL), × ``k_se``. It is not added on top of a measured scatter: the runs
  of a series score the same tokens (their key holds corpus, tokens and chunk), so the SE describes
  which tokens were drawn — shared by every run — not how runs differ;
* a change is a regression when it is worse than that margin *and* worse than the rule's minimum
  effect (e.g. mean KLD +10 %, throughput −5 %, ΔPPL +0.5 points);
* it is *flagged* at its commit when it persists: the runs from that commit on, pooled, are still
  worse than the same reference beyond the noise, and the latest commit is still worse than the
  minimum effect (else it is listed as recovered). A change with no noise estimate (one earlier run, no
  SE, no timed rounds) is listed as unconfirmed, never flagged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from . import fmt, registry
from .runs import Run
from .tables import TEXT_MAX, show

# Labels that are not inputs of a measurement: outputs of the test, or restatements of a label.
IGNORED_LABELS = {"spec", "answer", "diverged", "text_base", "text_tq", "versions_golden"}
# Tests that never load the real model although their suite does: their series do not carry its weights.
MODEL_FREE_SUITES = {"memory", "speed", "speed_attention", "speed_graph"}
MODEL_FREE_TESTS = {"test_random_unit_vectors"}
SHORT_LABELS = ("extra", "mode", "tokens", "chunk", "context", "batch", "d", "bits", "op", "phase")
MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution
IQR_SIGMA = 1.349  # interquartile range -> standard deviation of a normal distribution


@dataclass(frozen=True)
class Rule:
    """A minimum effect on one registered metric, or on every registered throughput (``metric=None``).

    ``threshold`` is relative (a fraction of the reference) or, with ``absolute``, in the metric's
    unit (ΔPPL in percentage points: relative changes of a number near 0 mean nothing). Which way is
    worse comes from the registry's direction; a metric that is not registered, or whose direction is
    "target" or "none", is never flagged.
    """

    name: str
    threshold: float
    metric: str | None = None  # a registered metric; None = every throughput (registry: Metric.is_rate)
    absolute: bool = False

    def __post_init__(self):
        if self.metric is not None and registry.lookup(self.metric).sign == 0:
            raise ValueError(f"rule {self.name!r}: {self.metric} has no better direction in {registry.FILE}")

    @property
    def direction(self) -> int:
        """+1: higher is better (a drop is flagged), -1: lower is better (a rise is flagged)."""
        return registry.lookup(self.metric).sign if self.metric else 1

    @property
    def text(self) -> str:
        way = "down" if self.direction > 0 else "up"
        amount = f"{self.threshold:g} {registry.lookup(self.metric).unit or ''}".strip() if self.absolute \
            else f"{100 * self.threshold:g}%"
        if self.absolute and self.metric and registry.lookup(self.metric).unit == "%":
            amount = f"{self.threshold:g} points"
        return f"{self.name} {way} by more than {amount}"

    def applies(self, metric: str, unit: str | None = None) -> bool:
        m = registry.get(metric)
        if m is None:
            return False
        return m.name == self.metric if self.metric else m.is_rate

    def bad(self, old: float, new: float) -> float:
        """The change in the bad direction, in the metric's unit (> 0 is worse)."""
        return -self.direction * (new - old)

    def worse(self, old: float, new: float) -> float | None:
        """The change in the bad direction as this rule measures it: relative (None when ``old`` is 0)
        or absolute."""
        if self.absolute:
            return self.bad(old, new)
        if old == 0:
            return None
        return self.bad(old, new) / abs(old)

    def regressed(self, old: float, new: float) -> bool:
        """Worse than the minimum effect (the noise is judged separately, by ``assess``)."""
        w = self.worse(old, new)
        return w is not None and w > self.threshold


def default_rules(kld: float = 0.10, speed: float = 0.05, dppl: float = 0.5) -> list[Rule]:
    return [Rule("mean KLD", kld, "kld_mean"), Rule("ΔPPL", dppl, "dppl_pct", absolute=True),
            Rule("throughput", speed)]


@dataclass(frozen=True)
class Noise:
    """How far beyond its noise a change must be: ``k`` × the runs' scatter or the rounds' spread, else
    ``k_se`` × a recorded standard error; the reference is the median of the last ``window`` earlier runs."""

    k: float = 3.0  # × the scatter of the runs or the spread of the timed rounds
    k_se: float = 2.0  # × the recorded standard error, until the series has runs enough for a scatter
    window: int = 10
    min_points: int = 4  # earlier runs needed before their MAD is used as the scatter

    def __post_init__(self):
        if not (self.k > 0 and self.k_se > 0 and self.window >= 1 and self.min_points >= 2):
            raise ValueError(f"noise model out of range: {self}")


@dataclass(frozen=True)
class Key:
    target: str
    model: str | None
    corpus: str | None
    suite: str
    metric: str
    labels: tuple  # ((name, shown value), ...) sorted
    weights: str | None = None
    device: str | None = None
    tier: str | None = None

    @property
    def label_text(self) -> str:
        return " · ".join(f"{k}={v}" for k, v in self.labels) or "—"

    def label(self, name: str):
        return dict(self.labels).get(name)

    def fields(self) -> dict:
        """Everything that tells this series from another of the same metric, as shown text."""
        out = {"suite": self.suite, "model": self.model, "weights": (self.weights or "")[:8] or None,
               "corpus": (self.corpus or "")[:8] or None, "device": self.device, "tier": self.tier}
        out.update(dict(self.labels))
        return {k: v for k, v in out.items() if v is not None and v != fmt.DASH}

    @property
    def text(self) -> str:
        return " · ".join(f"{k}={v}" for k, v in self.fields().items()) or "—"

    @property
    def short(self) -> str:
        """Config (or cache) and backend, then the protocol labels it has: a table row's summary."""
        lab = dict(self.labels)
        head = [lab[k] for k in ("config", "cache", "backend") if k in lab]
        rest = [f"{k}={lab[k]}" for k in SHORT_LABELS if k in lab]
        return " · ".join(head + rest) or "labels"


def differing(keys: list[Key], always: tuple = ("config", "backend")) -> dict[Key, str]:
    """Per key, a legend name: the ``always`` fields, then every field whose value differs between
    ``keys`` (what tells the lines apart: tier, tokens, device, ...)."""
    fields = [k.fields() for k in keys]
    names = list(dict.fromkeys(n for f in fields for n in f))
    vary = [n for n in names if len({f.get(n) for f in fields}) > 1 and n not in always]
    out = {}
    for k, f in zip(keys, fields):
        parts = [str(f[n]) for n in always if f.get(n) is not None]
        parts += [str(f[n]) if n == "suite" else f"{n}={f[n]}" for n in vary if n in f]
        out[k] = " · ".join(parts) or "all"
    return out


@dataclass(eq=False)
class Point:
    run: Run
    value: float
    error: float | None
    unit: str
    spread: float | None = None  # relative noise of one timed run: half the range of its rounds / median


@dataclass(eq=False)
class Regression:
    key: Key
    rule: Rule
    before: Point  # the last run before the commit
    at: Point  # the commit's first run
    latest: Point  # the series' latest run
    change: float  # (value - reference) / |reference|, signed as measured
    persisted: bool
    reference: float = math.nan  # median of the earlier runs compared against
    value: float = math.nan  # median of the commit's runs
    margin: float | None = None  # how much worse than the reference counts as beyond the noise (None: unknown)
    noise_from: str = ""  # which estimate set the margin
    history: int = 0  # earlier runs in the reference
    runs_at: int = 1  # runs of the commit

    @property
    def confirmed(self) -> bool:
        """Worse beyond a known noise (not merely beyond the minimum effect)."""
        return self.margin is not None

    @property
    def change_text(self) -> str:
        if self.rule.absolute:
            return f"{self.value - self.reference:+.3g}{' points' if self.at.unit == '%' else ' ' + self.at.unit}"
        return f"{100 * self.change:+.1f}%"


def _device(run: Run, backend) -> str | None:
    m = run.run.get("machine") if isinstance(run.run.get("machine"), dict) else {}
    b = str(backend or ",".join(run.run.get("backends") or []))
    if "cuda" in b and m.get("gpu"):
        return str(m["gpu"])
    dev = m.get("cpu")
    if "mlx" in b and run.run.get("mlx_blas"):
        dev = f"{dev} · {run.run['mlx_blas']}"
    return str(dev) if dev else None


def _test_function(nodeid: str) -> str:
    return str(nodeid).split("::")[-1].split("[")[0]


def record_labels(rec: dict) -> tuple:
    return tuple(sorted((k, show(v)) for k, v in (rec.get("labels") or {}).items()
                        if k not in IGNORED_LABELS and registry.get(k) is None
                        and not (isinstance(v, str) and len(v) > TEXT_MAX)))


def key_of(run: Run, rec: dict) -> Key:
    """The series a record belongs to (``rec``: a results-file record, labels under ``labels``)."""
    labels = rec.get("labels") or {}
    model = labels.get("model")
    if model is None and rec["suite"] not in MODEL_FREE_SUITES and _test_function(rec.get("test", "")) \
            not in MODEL_FREE_TESTS:
        model = run.model
    weights = run.run.get("weights_sha256") if model is not None and model == run.model else None
    return Key(run.target, None if model is None else str(model), run.corpus_sha, rec["suite"], rec["metric"],
               record_labels(rec), weights, _device(run, labels.get("backend")), run.run.get("tier"))


def _spread(run: Run, test: str) -> float | None:
    """Half the range of a test's timed rounds over their median (interquartile range / 1.349 where the
    extremes are missing), or None when the test was not timed."""
    t = run.timings.get(test) if isinstance(run.timings, dict) else None
    if not isinstance(t, dict):
        return None
    try:
        med = float(t["median"])
        lo, hi = (float(t["min"]), float(t["max"])) if t.get("min") is not None and t.get("max") is not None \
            else (None, None)
        if lo is None:
            return (float(t["q3"]) - float(t["q1"])) / IQR_SIGMA / med if med > 0 else None
    except (KeyError, TypeError, ValueError):
        return None
    if not (med > 0 and math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (hi - lo) / 2 / med


def series(runs: list[Run]) -> dict[Key, list[Point]]:
    """Every measurement of ``runs`` (one target, trend order) by series; the first record wins in a run."""
    out: dict[Key, list[Point]] = {}
    for run in runs:
        seen = set()
        for rec in run.records:
            key = key_of(run, rec)
            if key in seen:
                continue
            seen.add(key)
            out.setdefault(key, []).append(Point(run, rec["value"], rec.get("error"), rec.get("unit") or "",
                                                 _spread(run, rec.get("test", ""))))
    return out


def commits(pts: list[Point]) -> list[list[Point]]:
    """Points grouped by commit (and dirty flag), in trend order of each commit's first run."""
    groups: dict[tuple, list[Point]] = {}
    for p in pts:
        groups.setdefault((p.run.commit, bool(p.run.dirty)), []).append(p)
    return list(groups.values())


def _mad_sigma(values: list[float]) -> float:
    med = statistics.median(values)
    return MAD_SIGMA * statistics.median(abs(v - med) for v in values)


def t_quantile(z: float, dof: int) -> float:
    """Student's t quantile at the tail probability of a normal ``z`` (Cornish-Fisher, 2 terms): a scatter
    estimated from few runs is itself uncertain, so its margin widens (z = 3: 4.05 at 9 dof, 3.3 at 40)."""
    if dof <= 0:
        return math.inf
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def margin(hist: list[list[Point]], new: list[Point], rule: Rule, noise: Noise) -> tuple[float | None, str]:
    """How much worse than the reference (in the metric's unit) a commit's median must be to be beyond
    the noise, and which estimate set it; (None, why) when nothing estimates the noise."""
    flat = [p for g in hist for p in g][-noise.window:]
    ref = statistics.median(p.value for p in flat)
    val = statistics.median(p.value for p in new)
    cands = []
    # scatter: earlier runs of the series, and repeated runs of one commit (anywhere in the history)
    sig = []  # (sd, runs it was estimated from)
    if len(flat) >= noise.min_points:
        sig.append((_mad_sigma([p.value for p in flat]), len(flat)))
    resid = [p.value - statistics.median(q.value for q in g) for g in hist + [new] if len(g) > 1 for p in g]
    if len(resid) >= 2:
        sig.append((MAD_SIGMA * statistics.median(abs(r) for r in resid) if any(resid) else 0.0, len(resid)))
    if sig:
        sd, n = max(sig)
        s = sd * math.sqrt(1 / len(new) + (math.pi / 2) / len(flat))
        cands.append((t_quantile(noise.k, n - 1) * s, f"{noise.k:g}σ scatter of {len(flat)} earlier run"
                      f"{'s' if len(flat) != 1 else ''}" + (" and repeated runs" if len(resid) >= 2 else "")
                      + f" (Student's t, {n - 1} dof)"))
    # round spread of the timed tests (relative noise of one run)
    sp_new = [p.spread for p in new if p.spread is not None]
    sp_ref = [p.spread for p in flat if p.spread is not None]
    if sp_new or sp_ref:
        rel = math.hypot(statistics.median(sp_new) if sp_new else statistics.median(sp_ref),
                         statistics.median(sp_ref) if sp_ref else statistics.median(sp_new))
        cands.append((noise.k * rel * max(abs(ref), abs(val)), f"{noise.k:g}× spread of the timed rounds"))
    if cands:
        return max(cands, key=lambda c: c[0])
    # no scatter yet: the recorded standard error of the new value stands in
    se = [p.error for p in new if p.error is not None and p.error == p.error and p.error > 0]
    if se:
        return (noise.k_se * statistics.median(se) / math.sqrt(len(se)),
                f"{noise.k_se:g}× standard error (fewer than {noise.min_points} earlier runs: no scatter yet)")
    return None, "no noise estimate: too few earlier runs, no standard error, no timed rounds"


def _median(groups: list[list[Point]]) -> float:
    return statistics.median(p.value for g in groups for p in g)


def _step(rule: Rule, before: list[list[Point]], after: list[list[Point]]) -> float:
    """How clearly the runs split into ``before`` and ``after`` (binary segmentation's statistic: the
    difference of the means in the bad direction, weighted by sqrt(n_b n_a / (n_b + n_a)))."""
    b = [p.value for g in before for p in g]
    a = [p.value for g in after for p in g]
    return rule.bad(statistics.fmean(b), statistics.fmean(a)) * math.sqrt(len(b) * len(a) / (len(b) + len(a)))


def assess(key: Key, pts: list[Point], rule: Rule, noise: Noise) -> list[Regression]:
    """The commits of one series that are worse than the reference beyond the rule's minimum effect.

    A commit starts a *persisting* regression when the runs from it on, pooled, are worse than the
    reference beyond the noise (and the latest commit is still worse than the minimum effect). Where
    several commits qualify, the step is placed where the runs split most clearly into before and
    after (binary segmentation), so a step is flagged at the commit that made it even when that
    commit's own run was noisy. After a step the series has a new level: later commits are compared
    with the runs from the step on. A commit worse beyond the noise that later recovered is listed
    (not flagged); one with no noise estimate is listed as unconfirmed."""
    groups = commits(pts)
    found = []
    start, j = 0, 1

    def persists(i: int, begin: int):
        hist, after = groups[begin:i], groups[i:]
        ref = statistics.median(p.value for p in [p for g in hist for p in g][-noise.window:])
        own = _median([groups[i]])
        if not rule.regressed(ref, own):
            return None
        pooled = _median(after)
        m, why = margin(hist, [p for g in after for p in g], rule, noise)
        ok = m is not None and rule.regressed(ref, pooled) and rule.bad(ref, pooled) > m \
            and rule.regressed(ref, _median([groups[-1]]))
        return (ref, m, why) if ok else None

    while j < len(groups):
        hist, new = groups[start:j], groups[j]
        flat = [p for g in hist for p in g][-noise.window:]
        ref, val = statistics.median(p.value for p in flat), _median([new])
        if not rule.regressed(ref, val):
            j += 1
            continue
        if persists(j, start) is not None:
            cands = [i for i in range(j, len(groups)) if persists(i, start) is not None]
            at = max(cands, key=lambda i: (_step(rule, groups[start:i], groups[i:]), -i))
            ref, m, why = persists(at, start)
            flat = [p for g in groups[start:at] for p in g][-noise.window:]
            val = _median([groups[at]])
            found.append(Regression(key, rule, groups[at - 1][-1], groups[at][0], pts[-1],
                                    (val - ref) / abs(ref) if ref else math.inf, True, ref, val, m, why,
                                    len(flat), len(groups[at])))
            start, j = at, at + 1
            continue
        m, why = margin(hist, new, rule, noise)
        if m is None or rule.bad(ref, val) > m:  # unconfirmed, or beyond the noise but recovered later
            found.append(Regression(key, rule, hist[-1][-1], new[0], pts[-1],
                                    (val - ref) / abs(ref) if ref else math.inf, False, ref, val, m, why,
                                    len(flat), len(new)))
        j += 1
    return found


def regressions(runs: list[Run], rules: list[Rule], noise: Noise | None = None) -> list[Regression]:
    """Every commit that is worse than its series' reference by a rule (confirmed or not), in series order."""
    noise = noise or Noise()
    found = []
    for key, pts in series(runs).items():
        rule = next((r for r in rules if r.applies(key.metric, pts[0].unit)), None)
        if rule is not None and len(pts) > 1:
            found += assess(key, pts, rule, noise)
    return found


def flagged(regs: list[Regression]) -> list[Regression]:
    """Per series, the first confirmed regression that persisted: the commit that introduced it."""
    first: dict[Key, Regression] = {}
    for r in regs:
        if r.confirmed and r.persisted and r.key not in first:
            first[r.key] = r
    return list(first.values())
