"""The ``tq`` command line (tq_core/cli.py), run as ``python -m tq_core.cli`` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

MODEL_TIMEOUT = 300  # s; one mlx compare on a loaded 2-core CPU took ~50 s


def tq(*args: str, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m tq_core.cli ARGS``; ``env`` adds to (or, with a None value, removes from) the environment."""
    full = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-m", "tq_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=cwd)


def _default_model_or_skip():
    from tq_core import models

    try:
        models.locate_gguf()
    except FileNotFoundError as exc:
        if not models._is_complete(models._default_target()):
            pytest.skip(f"default model unavailable: {exc}")


# ----------------------------------------------------------------------------- no model needed


def test_info():
    r = tq("info")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert out.startswith("tq-core ")
    lines = out.splitlines()
    i = lines.index("backends:")
    backends = {line.split()[0] for line in lines[i + 1:i + 3]}
    assert backends == {"torch", "mlx"}
    assert re.search(r"^  torch  cpu", out, re.M)
    assert "codebooks: dims 32, 48, 64, 80, 96, 112, 128, 160, 192, 256 x bits 1..8" in out


@pytest.mark.parametrize("args, message", [
    (["run", "--bits-k", "9"], "bits_k must be an int in 1..8, got 9"),
    (["compare", "--bits-v", "0"], "bits_v must be an int in 1..8, got 0"),
    (["run", "--backend", "jax"], "backend must be one of ('torch', 'mlx'), got 'jax'"),
    (["compare", "--backend", "jax"], "backend must be one of ('torch', 'mlx'), got 'jax'"),
    (["run", "--model", "/nonexistent/path"], "--model /nonexistent/path: model directory not found: /nonexistent/path"),
    (["run", "--sinks", "-1"], "sinks must be a non-negative int, got -1"),
])
def test_bad_input_one_error_line(args, message):
    r = tq(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tq: error: ")
    assert lines[0] == f"tq: error: {message}"
    assert r.stdout == ""


def test_no_command_is_a_usage_error():
    r = tq()
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr


# ----------------------------------------------------------------------------- the default model

RUN_LINE = re.compile(r"^\[K4V2\+s4w128 (torch|mlx)\] (\d+) prompt \+ (\d+) new tokens; cache holds "
                      r"([\d,]+) B vs ([\d,]+) B as fp16 \((\d+\.\d{3})x\)$", re.M)
COMPARE_LINE = re.compile(r"^--- token match rate (\d\.\d{3}) over (\d+) tokens; "
                          r"first divergence: (none|token (\d+))$", re.M)


def _check_run(r, backend):
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stdout.strip(), "no generated text"
    m = RUN_LINE.search(r.stderr)
    assert m, r.stderr[-2000:]
    assert m.group(1) == backend
    prompt, new = int(m.group(2)), int(m.group(3))
    assert prompt > 10 and 1 <= new <= 8
    held, fp16 = int(m.group(4).replace(",", "")), int(m.group(5).replace(",", ""))
    assert held > 0 and fp16 > 0
    assert float(m.group(6)) == pytest.approx(held / fp16, abs=1e-3)


def _check_compare(r, backend):
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert re.search(rf"^--- baseline \({backend}, uncompressed cache, [\d,]+ B\)$", out, re.M), out
    assert re.search(rf"^--- K4V2\+s4w128 \({backend}, turboquant cache, [\d,]+ B\)$", out, re.M), out
    m = COMPARE_LINE.search(out)
    assert m, out
    rate, n = float(m.group(1)), int(m.group(2))
    assert 1 <= n <= 8
    assert 0.0 <= rate <= 1.0
    if m.group(3) == "none":
        assert rate == 1.0
    else:
        assert rate < 1.0 and 0 <= int(m.group(4)) < n


@pytest.mark.model
def test_run_torch():
    _default_model_or_skip()
    _check_run(tq("run", "--max-new-tokens", "8", "--backend", "torch", timeout=MODEL_TIMEOUT), "torch")


@pytest.mark.model
def test_compare_torch():
    _default_model_or_skip()
    _check_compare(tq("compare", "--max-new-tokens", "8", "--backend", "torch", timeout=MODEL_TIMEOUT),
                   "torch")


@pytest.mark.mlx
@pytest.mark.model
def test_run_mlx():
    pytest.importorskip("mlx_lm")
    _default_model_or_skip()
    _check_run(tq("run", "--max-new-tokens", "8", "--backend", "mlx", timeout=MODEL_TIMEOUT), "mlx")


@pytest.mark.mlx
@pytest.mark.model
def test_compare_mlx():
    pytest.importorskip("mlx_lm")
    _default_model_or_skip()
    _check_compare(tq("compare", "--max-new-tokens", "8", "--backend", "mlx", timeout=MODEL_TIMEOUT), "mlx")


@pytest.mark.model
def test_prompt_ids_with_a_transformers_tokenizer():
    """The root cause of the torch CLI failures, without loading the model weights."""
    _default_model_or_skip()
    from transformers import AutoTokenizer

    from tq_core import greedy, models

    tok = AutoTokenizer.from_pretrained(str(models.ensure_local()))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    expected = list(tok(text, add_special_tokens=False)["input_ids"])
    assert greedy.prompt_ids(tok, "Hi") == (expected, "chat")


@pytest.mark.model
def test_run_with_a_config_label():
    """--config takes any label, another method included; a bad label is one error line."""
    _default_model_or_skip()
    r = tq("run", "--max-new-tokens", "4", "--config", "uniform:K4V2+s0w0", timeout=MODEL_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[uniform:K4V2+s0w0 torch]" in r.stderr
    r = tq("run", "--config", "K4V9")
    assert r.returncode == 2 and r.stderr.splitlines() == ["tq: error: config label 'K4V9': bits_v must be an int in 1..8, got 9"]


# ----------------------------------------------------------------------------- hardening (issue G)


def one_error_line(r, *words):
    """Exit 2, no traceback, nothing on stdout, one stderr line ``tq: error: ...`` holding ``words``,
    and no model was loaded (the check came first)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Loading weights" not in r.stderr, "the model loaded before the input was checked"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tq: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == ""


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.parametrize("args, words", [
    (["run", "--device", "foo"], ("--device must be cpu, cuda, cuda:<index> or mps", "'foo'")),
    (["compare", "--device", ""], ("--device must be",)),
    (["run", "--device", "cuda:x"], ("--device must be",)),
    (["run", "--max-new-tokens", "0"], ("--max-new-tokens", "must be an int >= 1, got 0")),
    (["compare", "--max-new-tokens", "-3"], ("--max-new-tokens", "must be an int >= 1, got -3")),
    (["run", "--max-new-tokens", "many"], ("--max-new-tokens", "must be an int >= 1, got 'many'")),
    (["run", "--backend", "mlx", "--device", "cuda"], ("--device applies to --backend torch only",)),
])
def test_cli_refuses_before_loading(args, words):
    """Finding 8: bad --device / --max-new-tokens were found only inside the model load (a torch
    traceback) or after it; now one line, exit 2, before anything loads."""
    one_error_line(tq(*args), *words)


@pytest.mark.skipif(not _no_cuda(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cli_device_cuda_without_a_gpu(device):
    one_error_line(tq("run", "--device", device), f"--device {device}: no CUDA device here", "--device cpu")


def test_cli_model_that_does_not_exist():
    """Finding 8: a hub id that is neither a folder nor in the HF cache was a transformers traceback."""
    r = tq("run", "--model", "org/not-a-model", env={"HF_HUB_OFFLINE": "1"})
    one_error_line(r, "model 'org/not-a-model' is not a local folder", "Hugging Face hub id")


@pytest.mark.parametrize("cache_dir", ["/etc/passwd", "/etc/passwd/sub"])
def test_cli_cache_dir_that_is_a_file(cache_dir):
    """Finding 8: TQ_CACHE_DIR naming a file was a NotADirectoryError traceback; ``tq info`` says it."""
    one_error_line(tq("run", env={"TQ_CACHE_DIR": cache_dir}), f"TQ_CACHE_DIR={cache_dir} is not a folder")
    r = tq("info", env={"TQ_CACHE_DIR": cache_dir})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"^cache folder: unusable \(TQ_CACHE_DIR=.* is not a folder", r.stdout, re.M), r.stdout


def test_cli_report_out_is_a_file(tmp_path):
    """Finding 8: ``tq report --out <a file>`` was a NotADirectoryError traceback."""
    target = tmp_path / "site.html"
    target.write_text("mine")
    one_error_line(tq("report", "--out", str(target)), f"--out {target} is a file")
    assert target.read_text() == "mine"
    results = tmp_path / "results.json"
    results.write_text("{}")
    one_error_line(tq("report", "--results", str(results), "--out", str(tmp_path / "site")),
                   f"--results {results} is a file")


def test_cli_info_reports_an_unusable_mlx(tmp_path):
    """Finding 8: MLX installed without its CPU backend (``import mlx.core`` fails: libmlx.so
    missing) made ``tq info`` fail as a whole; now that backend's line says it is unusable."""
    fake = tmp_path / "mlx"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('libmlx.so: cannot open shared object file: "
                                  "No such file or directory')\n")
    r = tq("info", env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    line = next(x for x in lines[lines.index("backends:"):] if x.startswith("  mlx "))
    assert "unusable: ImportError: libmlx.so: cannot open shared object file" in line, line
    assert re.search(r"^  torch  cpu", r.stdout, re.M) and "codebooks:" in r.stdout


def test_cli_report_options_are_the_sites(tmp_path):
    """``tq report`` takes exactly ``python -m reports.site``'s options (declared once, in reports/site.py):
    its help lists them, and a bad value is one usage line."""
    helped = tq("report", "--help")
    assert helped.returncode == 0
    for option in ("--results", "--out", "--kld-regress", "--speed-regress", "--dppl-regress", "--noise-k", "--se-k"):
        assert option in helped.stdout
    bad = tq("report", "--kld-regress", "lots")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--kld-regress" in bad.stderr
