"""What a run covered, and which run a target's headline stands on.

A run is one of:

    complete    it ended (no ``run.incomplete``) and ran every headline suite (``HEADLINE_SUITES``
                that the checkout has) of the tier's whole matrix: nothing narrowed the selection
                (no -k/-m, no deselected items, no node ids, no ``--benchmark-only``, no
                ``--tq-config``/``--tq-method``/``--tq-model``/``--tq-corpus``)
    partial     it ended, but covered less: which suites, which model, what narrowed it is said
    incomplete  it did not end (interrupted, killed, a recovered stream): never a headline

Only complete runs stand for a target (its headline, its "latest"); partial and incomplete runs are
shown as such in the run history. The speed suites are timed in a serial pass of their own
(pytest-benchmark is off under xdist), so they are not required of a complete run; a run that
measured no speed says so (``run.speed``).

What a run covered is read from ``run.selection`` (written by ``reports.collect`` at collection:
items per suite, the suites the checkout has, what narrowed the selection) and from the suites
with test outcomes; files written before ``selection`` existed are judged by their outcomes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .runs import Run, suite_of

HEADLINE_SUITES = ("memory", "mse", "attention", "perplexity", "generation", "needle")
SPEED_SUITES = ("speed", "speed_attention", "speed_graph")


@dataclass
class Coverage:
    kind: str  # "complete" | "partial" | "incomplete"
    suites: list[str]  # suites with a test outcome or a record, in HEADLINE_SUITES order then by name
    missing: list[str]  # headline suites it did not run
    narrowed: list[str] = field(default_factory=list)  # what narrowed the selection
    models: list[str] = field(default_factory=list)  # the run's model, then any model label of its records
    tier: str | None = None
    incomplete: str | None = None
    speed: str | None = None  # "not measured: ..." when the run timed nothing
    tests: int = 0

    @property
    def complete(self) -> bool:
        return self.kind == "complete"

    @property
    def speed_measured(self) -> bool:
        return self.speed is None or not str(self.speed).startswith("not measured")

    @property
    def text(self) -> str:
        """One line: what the run was, for the run history."""
        suites = ", ".join(self.suites) or "no suite"
        if self.kind == "incomplete":
            return f"incomplete ({self.tests} tests: {suites}): {self.incomplete}"
        if self.kind == "complete":
            return f"complete: {suites}"
        why = []
        if self.missing:
            why.append(f"without {', '.join(self.missing)}")
        why += self.narrowed
        return f"partial: {suites}" + (f" ({'; '.join(why)})" if why else "")


def _order(suites) -> list[str]:
    rank = {s: i for i, s in enumerate(HEADLINE_SUITES + SPEED_SUITES)}
    return sorted(set(suites), key=lambda s: (rank.get(s, len(rank)), s))


def narrowed_by(selection: dict | None) -> list[str]:
    """What narrowed a run's selection, one phrase each (empty: the tier's whole matrix)."""
    if not isinstance(selection, dict):
        return []
    out = []
    if selection.get("keyword"):
        out.append(f"-k {selection['keyword']}")
    if selection.get("markexpr"):
        out.append(f"-m {selection['markexpr']}")
    if selection.get("deselected"):
        out.append(f"{selection['deselected']} items deselected")
    ids = [a for a in selection.get("args") or [] if "::" in str(a)]
    if ids:
        out.append(f"{len(ids)} test id{'s' if len(ids) != 1 else ''} named")
    if selection.get("benchmark_only"):
        out.append("--benchmark-only")
    for name, v in sorted((selection.get("options") or {}).items()):
        out.append(f"{name} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return out


def of(run: Run) -> Coverage:
    suites = {suite_of(t) for t in run.tests} | {r["suite"] for r in run.records}
    sel = run.run.get("selection") if isinstance(run.run.get("selection"), dict) else None
    available = set(sel.get("available_suites") or []) if sel else set()
    required = [s for s in HEADLINE_SUITES if not available or s in available]
    missing = [s for s in required if s not in suites]
    models = [m for m in dict.fromkeys([run.model] + [(r.get("labels") or {}).get("model") for r in run.records])
              if isinstance(m, str)]
    narrowed = narrowed_by(sel)
    incomplete = run.run.get("incomplete")
    kind = "incomplete" if incomplete else "complete" if not missing and not narrowed and run.tests else "partial"
    speed = run.run.get("speed")
    return Coverage(kind, _order(suites), missing, narrowed, models, run.run.get("tier"),
                    str(incomplete) if incomplete else None, str(speed) if speed else None, len(run.tests))


def latest(rs: list[Run]) -> Run:
    """The run that started last."""
    return max(rs, key=lambda r: (r.started, r.path.name))


def headline_run(rs: list[Run]) -> Run | None:
    """The latest complete run (by start), or None when no run of the target is complete."""
    done = [r for r in rs if of(r).complete]
    return latest(done) if done else None


def speed_runs(rs: list[Run], commit: str | None) -> list[Run]:
    """Ended runs of ``commit`` that timed a speed suite, latest first (a headline's speed column may
    come from the serial speed pass of the same commit)."""
    out = []
    for r in rs:
        c = of(r)
        if r.commit == commit and c.kind != "incomplete" and c.speed_measured and set(c.suites) & set(SPEED_SUITES):
            out.append(r)
    return sorted(out, key=lambda r: (r.started, r.path.name), reverse=True)
