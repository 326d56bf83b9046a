"""The ``tq`` command line (tq_core/cli.py), run as ``python -m tq_core.cli`` in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

MODEL_TIMEOUT = 300  # s; one mlx compare on a loaded 2-core CPU took ~50 s


def tq(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tq_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


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
    (["run", "--model", "/nonexistent/path"], "model directory not found: /nonexistent/path"),
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
