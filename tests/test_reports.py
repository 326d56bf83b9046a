"""The report renderer and the nightly site, on synthetic results files in the schema reports.collect writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reports import browser, render, runs, site, synthetic, trends

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def day(n: int) -> str:
    return f"2026-11-{n:02d}T02:00:00+00:00"


def write(folder, n: int, commit: str, **kw) -> Path:
    return synthetic.write(folder, commit=commit, started=day(n), seed=n, **kw)


def build(tmp_path, **kw) -> Path:
    out = tmp_path / "site"
    site.build(tmp_path / "results", out, **kw)
    return out


def flagged_commits(index_html: str) -> str:
    """The index's 'Flagged regressions' section."""
    return index_html.split("<h2>Flagged regressions</h2>", 1)[1]


# ---- render ------------------------------------------------------------------------------------
def test_render_imports_neither_torch_nor_mlx(tmp_path):
    write(tmp_path, 1, A)
    code = ("import sys; from reports import render, site; "
            f"assert render.main(['--target', 'cpu', '--results', {str(tmp_path)!r}, "
            f"'--out', {str(tmp_path / 'r.html')!r}]) == 0; "
            f"site.build({str(tmp_path)!r}, {str(tmp_path / 'site')!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm', 'transformers')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.html").is_file() and (tmp_path / "site" / "index.html").is_file()


def test_core_cli_does_not_import_reports():
    proc = subprocess.run([sys.executable, "-c", "import sys, tq_core.cli; assert 'reports' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_page_is_complete_and_self_contained(tmp_path, capsys):
    write(tmp_path, 1, A)
    html = render.page(runs.newest(tmp_path, "cpu"))
    assert "plot failed" not in html and "Traceback" not in capsys.readouterr().err
    assert html.count("<svg") >= 5
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    for suite in ("summary", "memory", "mse", "attention", "perplexity", "generation", "needle", "speed",
                  "provenance"):
        assert f'id="{suite}"' in html, suite
    # provenance: commit, corpus and weights hashes, seed, tier, machine, versions
    for text in (A, "c" * 64, "f" * 64, "synthetic CPU", "2.13.0+cpu", "<dt>seed</dt>", "<dt>tier</dt>"):
        assert text in html, text
    # headline: K4V2+s4w128 mean KLD with its error, measured through mode/chunk, against its baseline label
    assert "0.0400 ± 0.0032 nats" in html
    assert "mode=decode" in html and "chunk=512" in html and "uncompressed cache, same run" in html
    # generation: both texts at the first divergence
    assert "molecules scatter short wavelengths" in html and "molecules of air scatter" in html
    assert "PASS" in html


def test_failed_gate_is_reported(tmp_path):
    write(tmp_path, 1, A, fail=True)
    html = render.page(runs.newest(tmp_path, "cpu"))
    assert "FAIL" in html and "test_perplexity[config=K2V2+s4w128]" in html


def test_labels_are_escaped(tmp_path):
    data = synthetic.results(commit=A, started=day(1), note="<script>alert(1)</script>")
    for r in data["records"]:  # hostile labels that vary, so they reach legends, heat-map rows and table keys
        if r["suite"] in ("perplexity", "attention", "generation"):
            r["labels"]["mode"] = f"<script>{r['labels'].get('config')}</script>"
        if r["labels"].get("config") == "K3V2+s4w128":
            r["labels"]["config"] = "<img src=x onerror=alert(2)>"
    path = tmp_path / "cpu" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    html = render.page(runs.load(path))
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert html.count("<svg") >= 10 and "plot failed" not in html


def test_plot_without_data_is_omitted_with_a_note_and_unknown_metrics_still_show(tmp_path):
    data = synthetic.results(commit=A, started=day(1))
    keep = [r for r in data["records"] if r["suite"] == "perplexity" and r["metric"] != "bits_per_channel"]
    keep.append({"suite": "weird", "test": "suites/test_weird.py::test_x", "metric": "zeta_metric", "value": 3.5,
                 "unit": "zz", "error": 0.25, "labels": {"backend": "torch-cpu", "knob": 7}})
    path = tmp_path / "cpu" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**data, "records": keep}))
    html = render.page(runs.load(path))
    assert html.count("<svg") == 0  # the frontier has no bits to stand on: omitted, not drawn empty
    assert html.count("Plot omitted") == 2 and "bits-per-channel" in html
    assert "zeta_metric [zz]" in html and "3.50 ± 0.25" in html and "knob=7" in html


def test_render_cli_takes_the_newest_file(tmp_path):
    write(tmp_path, 1, A)
    write(tmp_path, 3, C)
    write(tmp_path, 2, B)
    out = tmp_path / "out" / "index.html"
    assert render.main(["--target", "cpu", "--results", str(tmp_path), "--out", str(out)]) == 0
    assert C[:10] in out.read_text()
    assert render.main(["--target", "cuda", "--results", str(tmp_path), "--out", str(out)]) == 2


def test_other_schema_is_refused(tmp_path):
    path = tmp_path / "cpu" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"schema": 2, "run": {}, "records": [], "tests": {}}))
    with pytest.raises(ValueError, match="schema"):
        runs.load(path)


# ---- site --------------------------------------------------------------------------------------
def test_site_trend_shows_both_commits(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B)
    out = build(tmp_path)
    page = (out / "cpu" / "index.html").read_text()
    assert A[:10] in page and B[:10] in page
    assert page.count("<svg") >= 5
    assert "2 runs on corpus" in page
    index = (out / "index.html").read_text()
    assert 'href="cpu/index.html"' in index and 'href="cpu/latest.html"' in index
    assert B[:10] in (out / "cpu" / "latest.html").read_text()


def test_planted_kld_regression_is_flagged_with_its_commit(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, kld_scale=1.5)
    index = (build(tmp_path) / "index.html").read_text()
    flags = flagged_commits(index)
    assert B[:10] in flags and "+50.0%" in flags and "kld_mean" in flags
    assert A[:10] in flags  # the run before it, linked for comparison
    assert (tmp_path / "site" / "cpu" / "runs" / f"20261102T020000_{B[:10]}.html").is_file()


def test_planted_improvement_is_not_flagged(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, kld_scale=0.5, speed_scale=1.5)
    index = (build(tmp_path) / "index.html").read_text()
    assert "No regression flagged" in index and B[:10] not in flagged_commits(index)


def test_throughput_threshold_is_configurable(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, speed_scale=0.9)  # -10 %
    flags = flagged_commits((build(tmp_path, speed_regress=0.05) / "index.html").read_text())
    assert "tokens_per_s" in flags and "vectors_per_s" in flags and "-10.0%" in flags
    flags = flagged_commits((build(tmp_path, speed_regress=0.15) / "index.html").read_text())
    assert "tokens_per_s" not in flags


def test_different_corpus_is_never_mixed(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, corpus_sha="e" * 64, kld_scale=3.0)
    out = build(tmp_path)
    assert "No regression flagged" in (out / "index.html").read_text()
    page = (out / "cpu" / "index.html").read_text()
    assert page.count("<h2>Trends") == 2 and page.count("1 run on corpus") == 2


def test_first_commit_of_a_persisting_regression_is_flagged(tmp_path):
    for n, (commit, scale) in enumerate([(A, 1.0), (B, 1.5), (C, 1.5), (D, 1.6)], start=1):
        write(tmp_path / "results", n, commit, kld_scale=scale)
    flags = flagged_commits((build(tmp_path) / "index.html").read_text())
    assert B[:10] in flags and C[:10] not in flags and D[:10] not in flags


def test_recovered_regression_is_listed_but_not_flagged(tmp_path):
    for n, (commit, scale) in enumerate([(A, 1.0), (B, 1.5), (C, 1.0)], start=1):
        write(tmp_path / "results", n, commit, kld_scale=scale)
    out = build(tmp_path)
    assert "No regression flagged" in (out / "index.html").read_text()
    assert "recovered later" in (out / "cpu" / "index.html").read_text()


def test_trend_order_is_commit_time_then_run_start(tmp_path):
    res = tmp_path / "results"
    write(res, 1, B, commit_time="2026-10-02T00:00:00+00:00", kld_scale=1.5)  # run first, but the later commit
    write(res, 2, A, commit_time="2026-10-01T00:00:00+00:00")
    rs = runs.runs_of(res, "cpu")
    assert [r.commit for r in rs] == [A, B]
    assert [f.at.run.commit for f in trends.flagged(trends.regressions(rs, trends.default_rules()))] == [B] * 4


def test_every_site_page_is_self_contained_with_working_links(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, kld_scale=1.5)
    write(tmp_path / "results", 1, A, target="mlx")
    pages = site.build(tmp_path / "results", tmp_path / "site")
    names = sorted(str(p.relative_to(tmp_path / "site")) for p in pages)
    assert names == ["cpu/index.html", "cpu/latest.html", f"cpu/runs/20261101T020000_{A[:10]}.html",
                     f"cpu/runs/20261102T020000_{B[:10]}.html", "index.html", "mlx/index.html", "mlx/latest.html"]
    for p in pages:
        html = p.read_text()
        external, broken, _ = browser.links(p, html)
        assert not external and not broken, (p, external, broken)
        assert not EXTERNAL.search(html)


def test_site_is_a_pure_function_of_the_results(tmp_path):
    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, kld_scale=1.5)
    first = {p.name: p.read_bytes() for p in build(tmp_path).rglob("*.html")}
    second = {p.name: p.read_bytes() for p in build(tmp_path).rglob("*.html")}
    assert first == second


def test_site_refuses_to_replace_a_foreign_folder(tmp_path):
    write(tmp_path / "results", 1, A)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        site.build(tmp_path / "results", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_tq_report_command(tmp_path, capsys):
    from tq_core import cli

    write(tmp_path / "results", 1, A)
    write(tmp_path / "results", 2, B, kld_scale=1.2)
    args = ["report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "site")]
    assert cli.main(args + ["--kld-regress", "0.3"]) == 0
    assert "No regression flagged" in (tmp_path / "site" / "index.html").read_text()
    assert cli.main(args + ["--kld-regress", "0.1"]) == 0
    assert B[:10] in flagged_commits((tmp_path / "site" / "index.html").read_text())
    assert "index.html" in capsys.readouterr().out
    assert cli.main(["report", "--results", str(tmp_path / "nothing")]) == 2
    assert "tq: error: no results folder" in capsys.readouterr().err


def test_regression_rules():
    kld, speed = trends.default_rules(0.10, 0.05)
    assert kld.applies("kld_mean", "nats") and not kld.applies("kld_max", "nats")
    assert speed.applies("decode_tokens_per_s", "tokens/s") and speed.applies("x", "GB/s")
    assert kld.regressed(0.10, 0.111) and not kld.regressed(0.10, 0.109) and not kld.regressed(0.10, 0.05)
    assert speed.regressed(100, 94) and not speed.regressed(100, 96) and not speed.regressed(100, 200)


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    write(tmp_path / "results", 1, A)
    (tmp_path / "results" / "cpu" / "broken.json").write_text("{not json")
    (tmp_path / "results" / "cpu" / ".tmp-x1.json").write_text("{")  # a write in progress: not a results file
    out = build(tmp_path)
    page = (out / "cpu" / "index.html").read_text()
    assert "broken.json" in page and ".tmp-x1" not in page
    assert runs.newest(tmp_path / "results", "cpu").commit == A


def test_suite_with_outcomes_but_no_records_has_no_dangling_link(tmp_path):
    data = synthetic.results(commit=A, started=day(1))
    data["tests"]["suites/test_ghost.py::test_x[backend=torch-cpu]"] = "error"
    path = tmp_path / "cpu" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    page = render.write(tmp_path / "r.html", render.page(runs.load(path)))
    html = page.read_text()
    assert "ghost" in html and "FAIL" in html
    external, broken, _ = browser.links(page, html)
    assert not external and not broken, broken


def test_headline_prefers_the_suites_own_protocol_over_extras():
    from reports import summary

    def rec(value, **labels):
        return {"suite": "perplexity", "metric": "kld_mean", "value": value, "error": None, "unit": "nats",
                "model": "m", **labels}

    decode = rec(0.004, mode="cache", chunk=1, tokens=384)
    chunked = rec(0.0039, mode="cache", chunk=64, tokens=512, extra="chunk64")
    simulated = rec(0.2, mode="simulated", chunk=64, tokens=512, extra="simulated")
    assert summary.pick([chunked, simulated, decode], "m") is decode  # shorter, but the headline protocol
    assert summary.pick([simulated, chunked], "m") is chunked  # only extras: still the cache over simulated
    longer = rec(0.008, mode="cache", chunk=1, tokens=1024)
    assert summary.pick([decode, longer, chunked], "m") is longer
