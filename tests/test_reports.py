"""The report renderer and the nightly site.

Pages are rendered from a real run of the suites' own code (``reports.sample``: the memory, MSE and
speed suites' cheapest cases, measured once per session in a subprocess), so the report is tested
on the metric names, units and labels the suites really write. Synthetic results files
(``reports.synthetic``, every metric checked against ``reports.registry``) stand in where a test
needs planted history (regressions across commits) or the suites that load the real model
(attention, perplexity, generation, needle: minutes on a CPU).
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reports import browser, registry, render, runs, sample, site, stream, summary, synthetic, trends

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> Path:
    """A results folder holding one run of the real suites (``reports.sample``), target ``cpu``."""
    root = tmp_path_factory.getbasetemp() / "real-results"
    sample.run(root)
    return root


def copy_real(real: Path, dest: Path) -> Path:
    shutil.copytree(real, dest)
    return dest


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


def put(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- render ------------------------------------------------------------------------------------
def test_render_imports_neither_torch_nor_mlx(real, tmp_path):
    code = ("import sys; from reports import render, site; "
            f"assert render.main(['--target', 'cpu', '--results', {str(real)!r}, "
            f"'--out', {str(tmp_path / 'r.html')!r}]) == 0; "
            f"site.build({str(real)!r}, {str(tmp_path / 'site')!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm', 'transformers')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.html").is_file() and (tmp_path / "site" / "index.html").is_file()


def test_report_of_a_real_run(real, capsys):
    run = runs.newest(real, "cpu")
    html = render.page(run)
    assert "plot failed" not in html and "Traceback" not in capsys.readouterr().err
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    for section in ("summary", "memory", "mse", "speed", "provenance"):
        assert f'id="{section}"' in html, section
    assert html.count("<svg") >= 4  # bytes vs context, D_mse vs bits, codec throughput, speed vs baseline
    assert run.commit and run.commit[:10] in html and "PASS" in html and "<dt>exitstatus</dt><dd>0</dd>" in html
    # Every metric is shown with its registered meaning and direction: a tooltip and the section glossary.
    unescaped = html_lib.unescape(html)
    for m in {r["metric"] for r in run.records}:
        assert f'title="{m}: {registry.lookup(m).meaning}' in unescaped, m
        assert f"<td><code>{m}</code></td>" in html, m
    assert "lower is better" in html and "higher is better" in html and "a fact: neither better nor worse" in html


def test_the_real_run_records_registered_metrics_in_their_units(real):
    run = runs.newest(real, "cpu")
    assert {r["suite"] for r in run.records} == {"memory", "mse", "speed"}
    for r in run.records:
        assert r["unit"] == registry.lookup(r["metric"]).unit, r
    assert run.run["exitstatus"] == 0 and "incomplete" not in run.run


def test_core_cli_does_not_import_reports():
    proc = subprocess.run([sys.executable, "-c", "import sys, tq_core.cli; assert 'reports' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_of_every_suite_is_complete_and_self_contained(tmp_path, capsys):
    """Every suite's section, the headline and the generation texts (synthetic: the model suites are slow here)."""
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
    assert "mode=cache" in html and "chunk=1" in html and "uncompressed cache, same run" in html
    assert 'title="kld_mean: mean KL(p_base ‖ p_cache)' in html  # the column says what it holds
    # generation: both texts at the first divergence
    assert "molecules scatter short wavelengths" in html and "molecules of air scatter" in html
    assert "PASS" in html


def test_directions_come_from_the_registry_not_the_name(tmp_path):
    """Names the old name-matching got wrong: more layers where norm correction wins is better; a
    host's GEMM rate is a fact about the machine, not a throughput of the code (never flagged)."""
    data = synthetic.results(commit=A, started=day(1))
    node = "suites/test_attention.py::test_norm_correction[backend=torch-cpu]"
    data["records"].append({"suite": "attention", "test": node, "metric": "layers_nc_on_better_kl_mean",
                            "value": 27.0, "unit": "layers", "error": None, "labels": {"backend": "torch-cpu"}})
    page = render.page(runs.load(put(tmp_path / "cpu", "x.json", data)))
    row = re.search(r"<tr><td><code>layers_nc_on_better_kl_mean</code></td><td>layers</td><td>([^<]*)</td>", page)
    assert row and row[1] == "higher is better", row
    assert "attn_kl_mean [nats] · lower is better: colors inverted" in page
    assert "attn_cos_mean · higher is better" in page
    assert "real_d_mse_unit_vs_reference [x]</text>" in page  # a ratio to a reference: no better end
    kld, speed = trends.default_rules()
    assert not speed.applies("mlx_gemm_gflops", "GFLOP/s") and not speed.applies("host_load_1m", "procs")
    assert speed.applies("vectors_per_s", "vec/s") and kld.direction == -1 and speed.direction == 1


def test_failed_gate_is_reported(tmp_path):
    write(tmp_path, 1, A, fail=True)
    html = render.page(runs.newest(tmp_path, "cpu"))
    assert "FAIL" in html and "test_perplexity[backend=torch-cpu-config=K2V2+s4w128]" in html


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
    assert speed.applies("decode_tokens_per_s", "tok/s") and speed.applies("gb_per_s", "GB/s")
    assert not speed.applies("not_registered_per_s", "x/s")  # unknown: no direction, never flagged
    assert kld.regressed(0.10, 0.111) and not kld.regressed(0.10, 0.109) and not kld.regressed(0.10, 0.05)
    assert speed.regressed(100, 94) and not speed.regressed(100, 96) and not speed.regressed(100, 200)
    with pytest.raises(ValueError, match="no better direction"):
        trends.Rule("tokens", 0.1, "tokens_held")


def test_host_facts_are_never_flagged_as_regressions(tmp_path):
    """The old rule took every ``…/s`` unit for a throughput of the code: a host with a slower BLAS
    (mlx_gemm_gflops) was flagged as a regression."""
    res = tmp_path / "results"
    for n, (commit, gflops) in enumerate([(A, 200.0), (B, 8.0)], start=1):
        data = synthetic.results(commit=commit, started=day(n), seed=n)
        data["records"].append({"suite": "speed", "test": "suites/test_speed.py::test_codec_throughput[d=64]",
                                "metric": "mlx_gemm_gflops", "value": gflops, "unit": "GFLOP/s", "error": None,
                                "labels": {"backend": "mlx"}})
        put(res / "cpu", f"{n}.json", data)
    assert "No regression flagged" in (build(tmp_path) / "index.html").read_text()


def test_unreadable_files_are_skipped_and_listed(tmp_path, capsys):
    write(tmp_path / "results", 1, A)
    (tmp_path / "results" / "cpu" / "broken.json").write_text("{not json")
    (tmp_path / "results" / "cpu" / ".tmp-x1.json").write_text("{")  # a write in progress: not a results file
    out = build(tmp_path)
    page = (out / "cpu" / "index.html").read_text()
    assert "broken.json" in page and ".tmp-x1" not in page
    assert runs.newest(tmp_path / "results", "cpu").commit == A
    err = capsys.readouterr().err
    assert "broken.json" in err and ".tmp-x1" not in err


# ---- results files of the wrong shape (review finding 1) ---------------------------------------
WRONG_SHAPES = {
    "array": ([], "the file is an array, not a results object"),
    "empty object": ({}, "results schema None"),
    "records as strings": (lambda d: {**d, "records": ["bytes_held", "kld_mean"]}, "record 0 is a string"),
    "value not a number": (lambda d: {**d, "records": [{**d["records"][0], "value": "abc"}] + d["records"][1:]},
                           "value 'abc' is not a finite number"),
    "labels not an object": (lambda d: {**d, "records": [{**d["records"][0], "labels": [1]}]},
                             "labels are an array"),
    "run not an object": (lambda d: {**d, "run": "x"}, "'run' is a string"),
    "started not a string": (lambda d: {**d, "run": {**d["run"], "started": 5}}, "run.started is a number"),
    "too deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
def test_a_well_formed_file_of_the_wrong_shape_is_skipped_with_one_warning(tmp_path, capsys, shape):
    """The newest file of the target is the bad one: the older good file is rendered, the site builds,
    and one warning line names the bad file and what is wrong with it."""
    res = tmp_path / "results"
    write(res, 1, A)
    make, why = WRONG_SHAPES[shape]
    good = synthetic.results(commit=B, started=day(2), seed=2)
    bad = put(res / "cpu", "20261102T020000_bbbbbbbbbb.json", make(good) if callable(make) else make)
    out = tmp_path / "r.html"
    assert render.main(["--target", "cpu", "--results", str(res), "--out", str(out)]) == 0
    assert A[:10] in out.read_text()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(bad) in err[0] and why in err[0], err
    page = (build(tmp_path) / "cpu" / "index.html").read_text()
    assert bad.name in page


def test_fifo_device_and_oversized_results_files_are_skipped_without_hanging(tmp_path):
    """Only regular files of sane size are read: a FIFO, a symlink to /dev/zero and a huge sparse file
    named ``*.json`` are each skipped with a warning (checked in a subprocess with a timeout: a
    blocking read of the FIFO would hang the renderer forever)."""
    res = tmp_path / "results"
    write(res, 1, A)
    folder = res / "cpu"
    os.mkfifo(folder / "20261103T000000_fifo.json")
    (folder / "20261104T000000_zero.json").symlink_to("/dev/zero")
    with open(folder / "20261105T000000_huge.json", "wb") as f:
        f.truncate(stream.MAX_BYTES + 1)
    code = ("from reports import render, site; "
            f"assert render.main(['--target', 'cpu', '--results', {str(res)!r}, '--out', {str(tmp_path / 'r.html')!r}]) == 0; "
            f"site.build({str(res)!r}, {str(tmp_path / 'site')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "fifo.json: not a regular file" in err and "zero.json: not a regular file" in err
    assert f"huge.json: {stream.MAX_BYTES + 1} bytes, more than" in err
    assert A[:10] in (tmp_path / "r.html").read_text()


# ---- target names and links (review finding 3) -------------------------------------------------
def test_a_target_folder_name_never_becomes_a_scheme_link(tmp_path, capsys):
    """A folder ``javascript:alert(1)`` with a results file in it: the old index linked
    ``href="javascript:alert(1)/index.html"``. It is skipped with a warning, and the link filter
    refuses anything but a relative path."""
    res = tmp_path / "results"
    write(res, 1, A)
    write(res, 1, A, target="javascript:alert(1)")
    out = build(tmp_path)
    html = "".join(p.read_text() for p in out.rglob("*.html"))
    assert "javascript:" not in html
    assert "not a target name" in capsys.readouterr().err
    for bad in ("javascript:alert(1)", "JavaScript:x", "data:text/html,x", "//evil.example/x", "/etc/passwd"):
        with pytest.raises(ValueError, match="refusing to link"):
            render.href(bad)
    assert render.href("cpu/index.html") == "cpu/index.html" and render.href("../index.html") == "../index.html"
    assert render.href("runs/a b.html") == "runs/a%20b.html"


@pytest.mark.parametrize("target", ["../../..", "../evil", ".hidden", "a/b", "", "x y"])
def test_target_names_are_checked(target):
    with pytest.raises(ValueError, match="results target"):
        stream.check_target(target)


def test_render_never_writes_outside_reports(tmp_path, capsys):
    """``--target`` names a folder under the results root and the page's folder under reports/: a target
    that is a path (absolute, or climbing with ..) is refused before anything is read or written.
    The old renderer wrote ``<target>/index.html`` wherever the target pointed."""
    evil = tmp_path / "evil"
    write(tmp_path, 1, A, target="evil")  # a results file where the path-like target leads
    for target in (str(evil), "../../.."):
        assert render.main(["--target", target, "--results", str(tmp_path / "results")]) == 2
        assert "results target" in capsys.readouterr().err
    assert not (evil / "index.html").exists()
    assert not (ROOT / "reports" / ".." / ".." / "index.html").exists()


# ---- incomplete runs ---------------------------------------------------------------------------
def test_an_incomplete_run_is_shown_incomplete_never_pass(tmp_path):
    res = tmp_path / "results"
    write(res, 1, A)
    data = synthetic.results(commit=B, started=day(2), seed=2)
    data["run"].update(exitstatus=2, incomplete="interrupted: KeyboardInterrupt",
                       unfinished_tests=["suites/test_speed.py::test_model_tokens_per_s[backend=torch-cpu]"])
    put(res / "cpu", "20261102T020000_bbbbbbbbbb.json", data)
    run = runs.newest(res, "cpu")
    assert summary.status(run) == "INCOMPLETE" and summary.gates(run)["status"] == "INCOMPLETE"
    out = build(tmp_path)
    index, target, latest = ((out / p).read_text() for p in ("index.html", "cpu/index.html", "cpu/latest.html"))
    for html in (index, latest):
        assert '<span class="badge incomplete">INCOMPLETE</span>' in html and "badge pass" not in html.split(
            "Latest run per target")[-1].split("</table>")[0]
        assert "interrupted: KeyboardInterrupt" in html
    assert "test_model_tokens_per_s" in latest and "exit status 2" in latest
    # the runs table: the first run passed, the second is incomplete with exit status 2
    assert target.count("badge pass") == 1 and target.count("badge incomplete") >= 2


def test_a_failing_exit_status_is_never_pass(tmp_path):
    data = synthetic.results(commit=A, started=day(1))
    data["run"]["exitstatus"] = 3  # an internal error after every test passed
    assert summary.status(runs.load(put(tmp_path / "cpu", "x.json", data))) == "FAIL"
    data["run"]["exitstatus"] = 0
    assert summary.status(runs.load(put(tmp_path / "cpu", "y.json", data))) == "PASS"


# ---- synthetic files follow the registry --------------------------------------------------------
def test_synthetic_results_use_registered_names_and_units():
    data = synthetic.results()
    for r in data["records"]:
        assert r["unit"] == registry.lookup(r["metric"]).unit, r
    assert {r["suite"] for r in data["records"]} == {"memory", "mse", "attention", "perplexity", "generation",
                                                      "needle", "speed"}


def test_site_from_real_records(real, tmp_path):
    """Two runs of real records (the second a copy under a later commit, 10 % slower): trends of the
    throughputs the suites record, a flagged regression, meanings under every trend."""
    res = copy_real(real, tmp_path / "results")
    first = runs.newest(res, "cpu")
    data = json.loads(first.path.read_text())
    data["run"].update(commit=B, commit_time="2099-01-01T00:00:00+00:00", started="2099-01-01T00:00:00+00:00")
    for r in data["records"]:
        if registry.lookup(r["metric"]).is_rate:
            r["value"] *= 0.9
    put(res / "cpu", f"20990101T000000_{B[:10]}.json", data)
    out = build(tmp_path)
    index, page = (out / "index.html").read_text(), (out / "cpu" / "index.html").read_text()
    assert "vectors_per_s" in flagged_commits(index) and B[:10] in flagged_commits(index)
    assert "speed: vectors_per_s" in page and "speed: decode_tokens_per_s" in page
    assert page.count('<span class="meaning"') >= 3 and "codec alone encodes or decodes" in page
    for p in out.rglob("*.html"):
        external, broken, _ = browser.links(p, p.read_text())
        assert not external and not broken, (p, external, broken)


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
