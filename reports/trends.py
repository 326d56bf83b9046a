"""Series of one measurement across runs, and regression detection on them.

A series is one (target, model, corpus sha256, suite, metric, labels) across a target's runs in
trend order (commit time, then run start): results of different corpora or models are never in
the same series. A regression is a step from one run to the next that is worse than a rule's
relative threshold (e.g. mean KLD +10 %, throughput -5 %). It is *flagged* when it persisted: every
later run of the series is still worse than the run before the step; the flag names the first
such run, i.e. the commit that introduced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import registry
from .runs import Run
from .tables import TEXT_MAX, show

IGNORED_LABELS = {"spec"}


@dataclass(frozen=True)
class Rule:
    """A relative threshold on one registered metric, or on every registered throughput (``metric=None``).

    Which way is worse comes from the registry's direction; a metric that is not registered, or whose
    direction is "target" or "none", is never flagged.
    """

    name: str
    threshold: float  # relative change, > 0
    metric: str | None = None  # a registered metric; None = every throughput (registry: Metric.is_rate)

    def __post_init__(self):
        if self.metric is not None and registry.lookup(self.metric).sign == 0:
            raise ValueError(f"rule {self.name!r}: {self.metric} has no better direction in {registry.FILE}")

    @property
    def direction(self) -> int:
        """+1: higher is better (a drop is flagged), -1: lower is better (a rise is flagged)."""
        return registry.lookup(self.metric).sign if self.metric else 1

    def applies(self, metric: str, unit: str | None = None) -> bool:
        m = registry.get(metric)
        if m is None:
            return False
        return m.name == self.metric if self.metric else m.is_rate

    def worse(self, old: float, new: float) -> float | None:
        """Relative change in the bad direction (> 0 is worse), None when ``old`` is 0."""
        if old == 0:
            return None
        return -self.direction * (new - old) / abs(old)

    def regressed(self, old: float, new: float) -> bool:
        w = self.worse(old, new)
        return w is not None and w > self.threshold


def default_rules(kld: float = 0.10, speed: float = 0.05) -> list[Rule]:
    return [Rule("mean KLD", kld, "kld_mean"), Rule("throughput", speed)]


@dataclass(frozen=True)
class Key:
    target: str
    model: str | None
    corpus: str | None
    suite: str
    metric: str
    labels: tuple  # ((name, shown value), ...) sorted

    @property
    def label_text(self) -> str:
        return " · ".join(f"{k}={v}" for k, v in self.labels) or "—"

    def label(self, name: str):
        return dict(self.labels).get(name)


@dataclass(eq=False)
class Point:
    run: Run
    value: float
    error: float | None
    unit: str


@dataclass(eq=False)
class Regression:
    key: Key
    rule: Rule
    before: Point
    at: Point
    latest: Point
    change: float  # relative, signed as measured: (at - before) / |before|
    persisted: bool


def record_labels(rec: dict) -> tuple:
    return tuple(sorted((k, show(v)) for k, v in (rec.get("labels") or {}).items()
                        if k not in IGNORED_LABELS and not (isinstance(v, str) and len(v) > TEXT_MAX)))


def series(runs: list[Run]) -> dict[Key, list[Point]]:
    """Every measurement of ``runs`` (one target, trend order) by series; the first record wins in a run."""
    out: dict[Key, list[Point]] = {}
    for run in runs:
        seen = set()
        for rec in run.records:
            key = Key(run.target, run.model, run.corpus_sha, rec["suite"], rec["metric"], record_labels(rec))
            if key in seen:
                continue
            seen.add(key)
            out.setdefault(key, []).append(Point(run, rec["value"], rec.get("error"), rec.get("unit") or ""))
    return out


def regressions(runs: list[Run], rules: list[Rule]) -> list[Regression]:
    """Every step that regressed by a rule, with whether it persisted to the latest run of its series."""
    found = []
    for key, pts in series(runs).items():
        rule = next((r for r in rules if r.applies(key.metric, pts[0].unit)), None)
        if rule is None:
            continue
        for i in range(1, len(pts)):
            before, at = pts[i - 1], pts[i]
            if rule.regressed(before.value, at.value):
                persisted = all(rule.regressed(before.value, p.value) for p in pts[i:])
                found.append(Regression(key, rule, before, at, pts[-1], (at.value - before.value) / abs(before.value),
                                        persisted))
    return found


def flagged(regs: list[Regression]) -> list[Regression]:
    """Per series, the first regression that persisted: the commit that introduced it."""
    first: dict[Key, Regression] = {}
    for r in regs:
        if r.persisted and r.key not in first:
            first[r.key] = r
    return list(first.values())
