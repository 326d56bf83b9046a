"""Write a model's calibration table from a results file: the quality bands of ``suites/gates.py``.

    python -m suites.calibrate reports/results/cpu/<file>.json [more results files of the same model]
                               [--out DIR] [--model ID_OR_PATH] [--replace] [--dry-run]

Like updating goldens: run the suites on the model (``pytest suites/ --tq-model <folder>``: every
quality gate is recorded ``gate_calibrated = 0`` while the model has no table), check the results,
then calibrate from that run. The command writes ``<DIR>/<model id>.json`` (default DIR:
``suites/calibration``; ``TQ_CALIBRATION_DIR`` makes the gates read another folder first), prints
every row with the band it implies, and leaves the review and the commit to you. A re-run of the
same suites then checks the model against real bands.

What it takes from the run, per gated test (a ``gate_calibrated`` record and the measurements
beside it), keyed as the gates look them up:

* perplexity: KLD, ΔPPL and same-top-1, each ± SE, per (config, positions, chunk, mode, backend);
  the gate's band is the value ± ``gates.PPL_SE_TOL`` SE (KLD two-sided);
* attention: 1 - cosine, KL and top-8 overlap (means over the measured layers) per (config,
  queries, backend); band: ``gates.ATTN_LO``..``ATTN_HI`` x the value, top-8 ± ``ATTN_TOP8_TOL``;
* real_mse: D_mse / reference per (kind, bits, norm correction, backend), bands from
  ``gates.real_mse_bands`` (per-layer min/max widened by 10 %, mean ± max(3 SE, 0.02));
* generation: the mean match rate per (tier, config, backend); floor ``gates.generation_floor``;
* needle: keys retrieved vs the baseline per (tier, config, backend); limit ``gates.needle_limit``.

It refuses (exit status 2, one line each): a file that is not a results file, a run marked
incomplete, a run with failed or erroring tests, a run without its model's weights hash, records
of another model than the run's (or than ``--model``), files of different models, and a table of
the same id measured on other weights (unless ``--replace``). Rows of an existing table for the
same weights are kept unless the run measured them again (then replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile

from suites import gates

ABOUT = ("Quality bands of suites/gates.py for one model, written by `python -m suites.calibrate` from the "
         "results named in each row's source; review before committing. Rules and tolerances: suites/gates.py.")
KEYS = {  # the fields a row is looked up by, per section (gates.Table.find)
    "perplexity": ("config", "positions", "chunk", "mode", "backend"),
    "attention": ("config", "queries", "tokens", "backend"),
    "real_mse": ("kind", "bits", "norm_correction", "tokens", "backend"),
    "generation": ("tier", "config", "backend"),
    "needle": ("tier", "config", "backend"),
}
GATE_SECTION = {"perplexity": "perplexity", "attention": "attention", "norm_correction": "attention",
                "real_mse": "real_mse", "generation": "generation", "needle": "needle"}
IGNORED_LABELS = {"gate", "calibration"}


class Refused(Exception):
    """The results cannot calibrate a model (one line: why)."""


def _sig(x, digits: int = 6):
    return None if x is None else float(f"{x:.{digits}g}")


def load(path: pathlib.Path) -> dict:
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Refused(f"{path}: not a readable results file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict) or not isinstance(data.get("records"), list):
        raise Refused(f"{path}: not a results file (no run / records)")
    run = data["run"]
    if run.get("incomplete"):
        raise Refused(f"{path}: the run is incomplete ({run['incomplete']}): calibrate from a complete run")
    bad = sorted(t for t, o in (data.get("tests") or {}).items() if o in ("failed", "error"))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise Refused(f"{path}: {len(bad)} tests failed or errored ({', '.join(bad[:3])}{more}): "
                      "a model-independent check failed, fix that before calibrating")
    if not run.get("model") or not run.get("weights_sha256"):
        raise Refused(f"{path}: the run does not record its model's id and weights sha256 (run.model, "
                      "run.weights_sha256): it is from before models were recorded, or its weights were not local")
    return data


def _gated(data: dict, path: pathlib.Path):
    """(section, gate record, the test's other records) per gated test of the run."""
    by_test: dict = {}
    for r in data["records"]:
        by_test.setdefault(r["test"], []).append(r)
    model = data["run"]["model"]
    for test, recs in by_test.items():
        for g in recs:
            if g["metric"] != "gate_calibrated" or g["labels"].get("gate") not in GATE_SECTION:
                continue
            if g["labels"].get("model", model) != model:
                raise Refused(f"{path}: {test} measured model {g['labels']['model']!r}, the run names {model!r}")
            yield GATE_SECTION[g["labels"]["gate"]], g, recs


def _pick(recs, metric: str, **labels) -> dict:
    """The one record of ``metric`` whose labels include ``labels``."""
    found = [r for r in recs if r["metric"] == metric and all(r["labels"].get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise Refused(f"{recs[0]['test']}: {len(found)} records of {metric} with {labels} (expected one)")
    return found[0]


def rows_of(data: dict, path: pathlib.Path) -> dict:
    """{section: [row, ...]} the run's gated tests measured."""
    run = data["run"]
    src = (f"{pathlib.Path(path).name} ({run.get('target')}, {run.get('tier')} tier, commit "
           f"{str(run.get('commit'))[:10]}{' dirty' if run.get('dirty') else ''}, {run.get('started')})")
    out = {s: [] for s in KEYS}
    for section, g, recs in _gated(data, path):
        lab = {k: v for k, v in g["labels"].items() if k not in IGNORED_LABELS}
        backend = lab.get("backend")
        if section == "perplexity":
            sel = {k: lab[k] for k in ("config", "mode", "chunk", "tokens") if k in lab}
            kld, dppl = _pick(recs, "kld_mean", **sel), _pick(recs, "dppl_pct", **sel)
            top1, pos = _pick(recs, "same_top1_pct", **sel), _pick(recs, "positions_scored", **sel)
            out[section].append({
                "config": lab["config"], "positions": int(pos["value"]), "chunk": lab["chunk"], "mode": lab["mode"],
                "backend": backend, "kld": _sig(kld["value"]), "kld_se": _sig(kld["error"], 3),
                "dppl": _sig(dppl["value"], 4), "dppl_se": _sig(dppl["error"], 3), "top1": _sig(top1["value"], 5),
                "top1_se": _sig(top1["error"], 3), "source": src})
        elif section == "attention":
            configs = sorted({r["labels"]["config"] for r in recs if r["metric"] == "attn_cos_mean_layers_mean"})
            for config in configs:
                sel = {"config": config, "queries": lab.get("queries")}
                cos = _pick(recs, "attn_cos_mean_layers_mean", **sel)["value"]
                kl = _pick(recs, "attn_kl_mean_layers_mean", **sel)["value"]
                top8 = _pick(recs, "attn_top8_overlap_layers_mean", **sel)["value"]
                out[section].append({
                    "config": config, "queries": lab.get("queries"), "tokens": None, "backend": backend,
                    "one_minus_cos": _sig(1 - cos), "kl": _sig(kl), "top8": _sig(top8, 5),
                    "layers": lab.get("layers"), "source": src})
        elif section == "real_mse":
            sel = {k: lab[k] for k in ("kind", "bits", "norm_correction")}
            mean = _pick(recs, "real_d_mse_unit_vs_reference_mean", **sel)
            lo = _pick(recs, "real_d_mse_unit_vs_reference_min", **sel)["value"]
            hi = _pick(recs, "real_d_mse_unit_vs_reference_max", **sel)["value"]
            out[section].append({
                **sel, "tokens": None, "backend": backend,
                **gates.real_mse_bands(mean["value"], mean["error"] or 0.0, lo, hi),
                "measured": {"mean": _sig(mean["value"], 5), "mean_se": _sig(mean["error"], 3),
                             "min": _sig(lo, 5), "max": _sig(hi, 5)},
                "layers": lab.get("layers"), "source": src})
        elif section == "generation":
            m = _pick(recs, "match_rate_mean", config=lab["config"])
            out[section].append({
                "tier": run.get("tier"), "config": lab["config"], "backend": backend,
                "prompts": m["labels"].get("prompts"), "measured": _sig(m["value"], 4),
                "min_mean_match": gates.generation_floor(m["value"]), "source": src})
        elif section == "needle":
            config = lab["config"]
            got = _pick(recs, "retrieved", config=config)
            base = _pick(recs, "retrieved", config="baseline")
            cases = int(got["labels"]["cases"])
            lost = int(base["value"]) - int(got["value"])
            out[section].append({
                "tier": got["labels"].get("grid") or run.get("tier"), "config": config, "backend": backend,
                "cases": cases, "baseline": int(base["value"]), "retrieved": int(got["value"]),
                "max_lost": gates.needle_limit(lost, cases), "source": src})
    return out


def band_text(section: str, r: dict) -> str:
    """One line: the row's key and the band the gates will apply."""
    tol = gates.PPL_SE_TOL
    if section == "perplexity":
        lo = max(r["kld"] - tol * r["kld_se"], r["kld"] / 2)
        return (f"{r['config']} {r['positions']} positions chunk {r['chunk']} {r['mode']} {r['backend']}: "
                f"KLD {r['kld']:.4g} ± {r['kld_se']:.2g} -> {lo:.4g}..{r['kld'] + tol * r['kld_se']:.4g}; "
                f"ΔPPL {r['dppl']:+.3g} % -> <= {r['dppl'] + tol * r['dppl_se']:+.3g} %; "
                f"top-1 {r['top1']:.2f} % -> >= {r['top1'] - tol * r['top1_se']:.2f} %")
    if section == "attention":
        return (f"{r['config']} {r['queries']} queries {r['backend']}: 1-cos {r['one_minus_cos']:.4g} -> "
                f"{r['one_minus_cos'] * gates.ATTN_LO:.4g}..{r['one_minus_cos'] * gates.ATTN_HI:.4g}; KL {r['kl']:.4g} "
                f"-> {r['kl'] * gates.ATTN_LO:.4g}..{r['kl'] * gates.ATTN_HI:.4g}; top-8 {r['top8']:.4f} ± "
                f"{gates.ATTN_TOP8_TOL}")
    if section == "real_mse":
        m = r["measured"]
        return (f"{r['kind'].upper()}{r['bits']} nc={r['norm_correction']} {r['backend']}: layers "
                f"{m['min']:.4f}..{m['max']:.4f} -> {r['layer_band'][0]}..{r['layer_band'][1]}; mean {m['mean']:.4f} "
                f"-> {r['mean_band'][0]}..{r['mean_band'][1]}")
    if section == "generation":
        return (f"{r['tier']} {r['config']} {r['backend']}: mean match rate {r['measured']:.3f} -> "
                f">= {r['min_mean_match']}")
    return (f"{r['tier']} {r['config']} {r['backend']}: retrieved {r['retrieved']}/{r['cases']} (baseline "
            f"{r['baseline']}) -> at most {r['max_lost']} lost")


def _key(section: str, row: dict) -> tuple:
    return tuple(row.get(k) for k in KEYS[section])


def merge(old: dict | None, new_rows: dict) -> tuple[dict, dict]:
    """(sections merged: new rows replace old rows of the same key, {section: (added, replaced, kept)})."""
    merged, counts = {}, {}
    for section in KEYS:
        rows = {_key(section, r): r for r in ((old or {}).get(section) or [])}
        kept = len(rows)
        added = replaced = 0
        for r in new_rows.get(section, []):
            k = _key(section, r)
            if k in rows:
                replaced += 1
                kept -= 1
            else:
                added += 1
            rows[k] = r
        merged[section] = list(rows.values())
        counts[section] = (added, replaced, kept)
    return merged, counts


def dumps(table: dict) -> str:
    """The table as JSON with one row per line (reviewable diffs)."""
    lines = ["{"]
    items = list(table.items())
    for i, (k, v) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if k in KEYS:
            if not v:
                lines.append(f" {json.dumps(k)}: []{end}")
                continue
            lines.append(f" {json.dumps(k)}: [")
            for j, row in enumerate(v):
                lines.append("  " + json.dumps(row, ensure_ascii=False) + ("," if j < len(v) - 1 else ""))
            lines.append(f" ]{end}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{end}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def safe_name(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._") or "model"


def _check_model_option(option: str, run: dict) -> None:
    from harness import identity

    if identity.model_id(option) != run["model"]:
        raise Refused(f"--model {option} names {identity.model_id(option)!r}, the results are of {run['model']!r}")
    from tq_core import models

    try:
        local = models.ensure_local(option)
    except FileNotFoundError as e:
        raise Refused(f"--model {option}: {e}") from None
    if not isinstance(local, str):
        sha = identity.weights_sha256(local)
        if sha != run["weights_sha256"]:
            raise Refused(f"--model {option} has weights {sha[:12]}…, the results were measured on "
                          f"{run['weights_sha256'][:12]}…: another model")


def calibrate(paths: list, out: pathlib.Path, model: str | None = None, replace: bool = False,
              dry_run: bool = False, say=print) -> pathlib.Path:
    """Write (or update) the table of the model ``paths`` measured; returns its path."""
    datas = [load(pathlib.Path(p)) for p in paths]
    run = datas[0]["run"]
    for p, d in zip(paths[1:], datas[1:]):
        if (d["run"]["model"], d["run"]["weights_sha256"]) != (run["model"], run["weights_sha256"]):
            raise Refused(f"{p} is of model {d['run']['model']!r} ({d['run']['weights_sha256'][:12]}…), "
                          f"{paths[0]} of {run['model']!r} ({run['weights_sha256'][:12]}…): one model per table")
    if model is not None:
        _check_model_option(model, run)
    new_rows: dict = {s: [] for s in KEYS}
    for p, d in zip(paths, datas):
        for section, rows in rows_of(d, pathlib.Path(p)).items():
            new_rows[section].extend(rows)
    if not any(new_rows.values()):
        raise Refused(f"{', '.join(map(str, paths))}: no gated quality measurement to calibrate from "
                      "(run the quality suites: perplexity, attention, mse, generation, needle)")
    target = pathlib.Path(out) / f"{safe_name(run['model'])}.json"
    old = None
    if target.is_file():
        old = json.loads(target.read_text(encoding="utf-8"))
        old_sha = (old.get("model") or {}).get("weights_sha256")
        if old_sha and old_sha != run["weights_sha256"] and not replace:
            raise Refused(f"{target} holds the bands of {run['model']!r} with weights {old_sha[:12]}…; these results "
                          f"are of weights {run['weights_sha256'][:12]}…: another model under the same name "
                          "(pass --replace to overwrite it, or rename the model's folder)")
        if old_sha != run["weights_sha256"]:
            old = None
    sections, counts = merge(old, new_rows)
    info = dict(run.get("model_info") or {})
    table = {
        "about": ABOUT,
        "model": {"id": run["model"], "weights_sha256": run["weights_sha256"],
                  **{k: v for k, v in info.items() if k not in ("id",)}},
        "corpus": run.get("corpus"),
        **sections,
    }
    say(f"model {run['model']} (weights {run['weights_sha256'][:12]}…), from {len(paths)} results file(s)")
    for section in KEYS:
        added, replaced, kept = counts[section]
        if not (added or replaced or kept):
            continue
        say(f"  {section}: {added} new, {replaced} replaced, {kept} kept")
        for r in new_rows[section]:
            say(f"    {band_text(section, r)}")
    if dry_run:
        say(f"dry run: {target} not written")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dumps(table))
    os.replace(tmp, target)
    say(f"wrote {target}: review it (git diff) and commit it; the suites now check {run['model']} against these bands")
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suites.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results file(s) of one model (reports/results/<target>/*.json)")
    ap.add_argument("--out", default=str(gates.CALIBRATION_DIR), help="folder of the table (default: %(default)s)")
    ap.add_argument("--model", default=None, help="check that the results are of this model (id or local path)")
    ap.add_argument("--replace", action="store_true", help="overwrite a table of the same id measured on other weights")
    ap.add_argument("--dry-run", action="store_true", help="print the rows, write nothing")
    args = ap.parse_args(argv)
    try:
        calibrate(args.results, pathlib.Path(args.out), args.model, args.replace, args.dry_run)
    except Refused as e:
        print(f"calibrate: refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
