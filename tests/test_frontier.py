"""The quality-per-bit frontier (``reports.frontier``): front membership, the real H200 nightly run,
a second method that beats a TurboQuant config, and the pages that show it.

The real run is the committed H200 nightly file (7 TurboQuant configs scored by the perplexity suite
at 1 024 tokens, decode semantics, torch-cuda). No committed run measured a second method: the
"uniform:" points below are a synthetic variant built in the test from that file's own records,
relabelled and given other values, and never written outside the test's temporary folder.
"""

from __future__ import annotations

import copy
import html as html_lib
import json
import re
import shutil
from pathlib import Path

import pytest

from reports import browser, frontier, render, runs, site, summary

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "reports" / "results" / "cuda"
CUDA_COMPLETE = CUDA / "20261201T000445_f1a4764.json"  # H200, nightly tier, complete
CUDA_HEADLINE = CUDA / "20261201T081006_8ba78d27d0.json"  # the newest complete nightly run: the cuda headline
EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
PROTOCOL = {"tokens": 1024, "chunk": 1, "mode": "cache"}  # the headline table's protocol in that file (asserted)
UNIFORM = "uniform:K3V2+s4w128+g=32"  # synthetic: relabelled K3V2+s4w128 records, values changed below
UNIFORM_LOSER = "uniform:K2V2+s4w128+g=32"  # synthetic: dominated by TurboQuant points


def in_memory(data: dict, name: str) -> runs.Run:
    run, recs, tests = runs.validate(data)
    return runs.Run(Path(f"/results/{data['run'].get('target', 'cpu')}/{name}.json"), run, recs, tests,
                    timings=runs.timings_of(data))


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(CUDA_COMPLETE.read_text())


@pytest.fixture(scope="module")
def real(data) -> runs.Run:
    return in_memory(data, CUDA_COMPLETE.stem)


def headline_records(data: dict, metric: str) -> dict:
    """config -> the value of ``metric`` the perplexity suite recorded under the headline protocol (decode
    semantics, mode cache, not simulated), read straight from the file."""
    out = {}
    for r in data["records"]:
        lab = r["labels"]
        if r["suite"] == "perplexity" and r["metric"] == metric and all(lab.get(k) == v for k, v in PROTOCOL.items()):
            assert lab["config"] not in out, f"two {metric} records for {lab['config']} under the protocol"
            out[lab["config"]] = r["value"]
    return out


def section(html: str, start: str, end: str) -> str:
    return html.split(start, 1)[1].split(end, 1)[0]


# ---- front membership ------------------------------------------------------------------------------
def test_front_membership_on_a_hand_made_set_with_ties():
    pts = [(1, 5),   # fewest bits: on the front whatever its quality
           (2, 3), (2, 3),  # identical: neither strictly beats the other, both on the front
           (3, 3),   # same KLD as (2, 3) with more bits: off
           (3, 1),   # more bits, lower KLD: on
           (4, 4),   # beaten on both: off
           (2, 4),   # same bits as (2, 3), higher KLD: off
           (5, 1),   # same KLD as (3, 1), more bits: off
           (None, 0.5)]  # no bits: neither on the front nor pushing others off it
    assert frontier.front(pts) == [True, True, True, False, True, False, False, False, None]
    assert frontier.dominates((2, 3), (2, 4)) and frontier.dominates((2, 3), (3, 3))
    assert not frontier.dominates((2, 3), (2, 3)) and not frontier.dominates((1, 5), (2, 3))
    assert frontier.front([(1.0, 1.0)]) == [True] and frontier.front([]) == []


def test_method_of_a_label():
    assert frontier.method_of("K4V2+s4w128") == ("turboquant", "K4V2+s4w128")
    assert frontier.method_of("uniform:K4V2+s4w128+g=32") == ("uniform", "K4V2+s4w128+g=32")
    assert frontier.method_of("turboquant:K4V2+s0w0") == ("turboquant", "K4V2+s0w0")


# ---- the real H200 nightly run ------------------------------------------------------------------------
def test_the_real_cuda_nightly_frontier(data, real):
    head = summary.table(real)
    assert head.protocol == "tokens=1024 · chunk=1 · mode=cache"
    bits, kld = headline_records(data, "bits_per_channel"), headline_records(data, "kld_mean")
    dppl, top1 = headline_records(data, "dppl_pct"), headline_records(data, "same_top1_pct")
    assert len(kld) == 7 and set(bits) == set(kld)
    (f,) = frontier.of(real, head)
    assert f.backend == "torch-cuda" and f.model == "smollm2-135m" and f.tokens == 1024 and not f.others
    pts = {p.config: p for p in f.points}
    assert set(pts) == set(kld)  # one point per config the suite scored under the headline protocol
    for config, p in pts.items():
        assert p.method == "turboquant" and p.turboquant and not p.beaten_by
        assert p.v("bits") == bits[config] and p.v("kld") == kld[config]
        assert p.v("dppl") == dppl[config] and p.v("top1") == top1[config]
        assert p.e("kld") is not None and p.e("dppl") is not None and p.e("top1") is not None
    plain = pts["K4V2+s0w0"]  # the codes alone: no sinks, no window
    assert plain.v("bits") == 3.25 and plain.v("kld") == pytest.approx(0.164, abs=5e-4)
    assert plain.v("bits32k") == pytest.approx(3.25)  # nothing fixed to amortize
    assert "extra=plain" in plain.cells["kld"].via  # measured through the suite's plain variant, and says so
    # sorted by bits held at the measured context
    assert [p.v("bits") for p in f.points] == sorted(bits.values())
    # front, from the file's values: the fewest bits, K2V2 next; K3V3 holds K4V2's bits at a higher KLD
    assert min(bits, key=bits.get) == "K4V2+s0w0" and plain.front
    assert pts["K2V2+s4w128"].front
    assert bits["K3V3+s4w128"] == bits["K4V2+s4w128"] and kld["K3V3+s4w128"] > kld["K4V2+s4w128"]
    assert not pts["K3V3+s4w128"].front
    assert [c for c, p in pts.items() if not p.front] == ["K3V3+s4w128"]
    # projected to 32k the window is amortized: K2V2+s4w128 holds the fewest bits and the plain config,
    # with more bits than K3V2+s4w128 and a higher KLD, leaves the front
    assert min(pts, key=lambda c: pts[c].v("bits32k")) == "K2V2+s4w128"
    assert pts["K2V2+s4w128"].front32k and pts["K4V2+s0w0"].front32k is False


def test_the_real_run_renders_the_section(real, capsys):
    html = render.page(real)
    assert "Traceback" not in capsys.readouterr().err
    assert '<a href="#frontier">Quality per bit</a>' in html
    sec = section(html, '<section id="frontier">', "</section>")
    text = html_lib.unescape(sec)
    assert "<h2>Quality per bit</h2>" in sec and sec.count("<svg") == 3
    for title in ("Mean KLD vs bits held", "ΔPPL vs bits held", "Mean KLD vs bits held at 32k tokens (projected)"):
        assert title in text, title
    rows = section(sec, "<tbody>", "</tbody>").split("<tr>")[1:]
    assert len(rows) == 7
    configs = [re.search(r'<span class="v">([^<]+)</span>', r).group(1) for r in rows]
    assert configs[0] == "K4V2+s0w0" and "K2V2+s4w128" in configs
    plain = html_lib.unescape(rows[0])
    assert "3.25 bit" in plain and "0.1642 ± 0.0061 nats" in plain and "yes" in plain
    k3v3 = html_lib.unescape(next(r for r in rows if "K3V3+s4w128" in r))
    assert re.search(r"<td>no</td><td>no</td>", k3v3)  # off the front, measured and at 32k
    # what every cell was measured through and against
    for said in ("tokens=1024 · chunk=1 · mode=cache", "from each config label", "uncompressed cache, same run",
                 "measured through →", "baseline →", "perplexity · extra=plain", "TurboQuant", "Pareto front"):
        assert said in text, said
    assert not EXTERNAL.search(html)


# ---- a second method (synthetic, from the real file's records) --------------------------------------------
def with_uniform(data: dict) -> dict:
    """The real file plus two synthetic ``uniform:`` configs: copies of K3V2+s4w128's (and K2V2's) headline
    protocol records relabelled, with bits and KLD set so that UNIFORM has fewer bits and a lower KLD than
    K3V2+s4w128 (beating it) and UNIFORM_LOSER more bits and a higher KLD than several TurboQuant points."""
    d = copy.deepcopy(data)
    planted = {UNIFORM: ("K3V2+s4w128", 0.97, 0.015), UNIFORM_LOSER: ("K2V2+s4w128", 1.3, 0.08)}
    for label, (source, bits_scale, kld) in planted.items():
        for r in data["records"]:
            lab = r["labels"]
            if r["suite"] != "perplexity" or lab.get("config") != source or lab.get("extra") is not None \
                    or any(lab.get(k) != v for k, v in PROTOCOL.items()):
                continue
            new = copy.deepcopy(r)
            new["labels"]["config"] = label
            new["test"] = r["test"].replace(source, label)
            if r["metric"] == "bits_per_channel":
                new["value"] = r["value"] * bits_scale
            elif r["metric"].startswith("bytes_") and r["metric"] != "bytes_baseline_cache":
                new["value"] = r["value"] * bits_scale  # every part in proportion: the projections follow
            elif r["metric"] == "kld_mean":
                new["value"] = kld
            d["records"].append(new)
    d["run"]["configs"] = list(d["run"]["configs"]) + [UNIFORM, UNIFORM_LOSER]
    return d


def test_a_second_method_that_dominates_a_turboquant_config_is_said(data):
    run = in_memory(with_uniform(data), "uniform")
    (f,) = frontier.of(run)
    pts = {p.config: p for p in f.points}
    assert len(pts) == 9 and f.others
    u, k3v2 = pts[UNIFORM], pts["K3V2+s4w128"]
    assert u.method == "uniform" and u.name == "K3V2+s4w128+g=32" and not u.turboquant
    assert u.v("bits") < k3v2.v("bits") and u.v("kld") < k3v2.v("kld")  # as planted
    assert u.front and not k3v2.front
    assert [b.by.config for b in k3v2.beaten_by] == [UNIFORM]
    beaten = {c for c, p in pts.items() if p.beaten_by}
    assert beaten == {"K3V2+s4w128"}  # the loser beats nobody; other TurboQuant points are not beaten
    assert not pts[UNIFORM_LOSER].front and not pts[UNIFORM_LOSER].beaten_by
    assert u.v("bits32k") == pytest.approx(k3v2.v("bits32k") * 0.97)  # projected from its own bytes per part
    html = html_lib.unescape(render.page(run))
    sec = section(html, '<section id="frontier">', "</section>")
    row = next(r for r in section(sec, "<tbody>", "</tbody>").split("<tr>")[1:] if ">K3V2+s4w128<" in r)
    assert f"{UNIFORM}: {u.v('bits'):.4g} vs {k3v2.v('bits'):.4g} bit" in row and "KLD lower by" in row
    assert "TurboQuant configs are circles; other methods have their own shape and colour." in sec
    # markers: TurboQuant circles, uniform squares, each named in the legend
    kld_svg = sec.split("<svg")[1]
    assert re.search(r"<rect [^>]*><title>uniform: 4\.3", kld_svg)  # a uniform point, a square
    assert re.search(r"<circle [^>]*><title>TurboQuant: ", kld_svg)
    assert ">uniform</text>" in kld_svg and ">TurboQuant</text>" in kld_svg


def test_no_perplexity_no_section(data):
    """A run whose perplexity suite did not run (here: its records removed) has no frontier and no section."""
    d = copy.deepcopy(data)
    d["records"] = [r for r in d["records"] if r["suite"] != "perplexity"]
    run = in_memory(d, "noppl")
    assert frontier.of(run) == []
    assert 'id="frontier"' not in render.page(run)


# ---- the site's target page -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("frontier-site")
    shutil.copytree(CUDA, tmp / "results" / "cuda")
    site.build(tmp / "results", tmp / "site")
    return tmp / "site"


def test_the_site_target_page_shows_the_headline_runs_frontier(cuda_site):
    page = (cuda_site / "cuda" / "index.html").read_text()
    assert '<h2 id="frontier">Quality per bit</h2>' in page
    sec = page.split('<h2 id="frontier">', 1)[1].split("<h2>Regressions</h2>", 1)[0]
    assert CUDA_HEADLINE.name in sec and sec.count("<svg") == 3
    assert len(section(sec, "<tbody>", "</tbody>").split("<tr>")[1:]) == 7
    assert not EXTERNAL.search(page)
    external, broken, _ = browser.links(cuda_site / "cuda" / "index.html", page)
    assert not external and not broken, (external, broken)
    latest = (cuda_site / "cuda" / "latest.html").read_text()
    assert '<section id="frontier">' in latest


@pytest.mark.skipif(browser.find() is None, reason="no Chromium: apt-get install -y chromium (or set TQ_CHROMIUM)")
def test_frontier_pages_load_clean_in_a_browser(cuda_site, data, tmp_path):
    report = render.write(tmp_path / "uniform.html", render.page(in_memory(with_uniform(data), "uniform")))
    for page, min_svg in ((cuda_site / "cuda" / "index.html", 3), (report, 3)):
        c = browser.check(page, height=3000)
        assert not c.problems(min_svg), (page, c.problems(min_svg))
        assert "Quality per bit" in c.dom
