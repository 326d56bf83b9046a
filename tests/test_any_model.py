"""A model the harness has never seen runs end to end: every suite's default tier, then calibration.

The model is built here from a config, with random weights, and saved to a temporary folder, as a
user's converted checkpoint would be. It differs from the default (SmolLM2-135M: llama, 30 full-
attention layers, 9 query / 3 KV heads, head_dim 64, a chat template) in every way the suites
could have assumed away:

* architecture: Gemma-3 text (``gemma3_text``: q/k norms, scaled embeddings, its own query scale);
* layer types: sliding-window layers (window 64, shorter than every protocol) between the full-
  attention ones, which the transformers cache keeps uncompressed;
* geometry: head_dim 32, 4 query heads over 1 KV head (GQA 4);
* tokenizer: the default model's, saved with ``chat_template=None`` (prompts fall back to plain
  text);
* weights: random, with a larger init range and query scale than Gemma's defaults so that its
  next-token distributions and attention are peaked like a trained model's (at the defaults every
  distribution is nearly uniform and a compressed cache's KLD is ~1e-5, under the "reads its
  codes" floor of 1e-4, which is about real models).

``pytest suites/ --tq-model <folder> --tq-target torch-cpu`` must finish without a failure or
error, record the model it measured (id, geometry, layer types, weights sha256), and mark every
quality gate uncalibrated; ``python -m suites.calibrate`` then writes the model's table (into a
temporary folder, read through ``TQ_CALIBRATION_DIR``) and a re-run of the perplexity suite checks
the model against it: every gate calibrated, and passing.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-gemma3"
SLIDING_WINDOW = 64
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
QUALITY_GATES = {"perplexity", "attention", "norm_correction", "real_mse", "generation", "needle"}
SUITE_TIMEOUT = 900  # seconds: the default tier takes ~30-60 s on 2 shared cores


def _require_default_model():
    from tq_core import models

    try:
        return models.ensure_local(None)
    except FileNotFoundError as exc:
        pytest.skip(f"the default model's tokenizer is needed for the tiny model: {exc}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A Gemma-3-like model with sliding-window layers and random weights, saved as an HF folder."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(str(_require_default_model()))
    tok.chat_template = None
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=SLIDING_WINDOW,
        layer_types=LAYER_TYPES, sliding_window_pattern=2,  # the same layers for mlx-lm, which reads the pattern
        max_position_embeddings=4096, initializer_range=0.3, query_pre_attn_scalar=8,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("models") / MODEL_NAME
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    assert not (folder / "chat_template.jinja").exists()
    return folder


def _run(args, env: dict, timeout: int = SUITE_TIMEOUT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TQ_CALIBRATION_DIR"))}
    full.update(env)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _results(folder: pathlib.Path) -> tuple[pathlib.Path, dict]:
    files = sorted(folder.glob("*/*.json"))
    assert len(files) == 1, f"expected one results file in {folder}, found {files}"
    return files[0], json.loads(files[0].read_text(encoding="utf-8"))


def _suites(model: pathlib.Path, results: pathlib.Path, calibration: pathlib.Path, *paths: str):
    """Run ``paths`` (default: every suite) on the model; (seconds, results file, its contents)."""
    t0 = time.perf_counter()
    proc = _run(["-m", "pytest", *(paths or ("suites",)), "-q", "-p", "no:cacheprovider", "--tq-target", "torch-cpu",
                 "--tq-model", str(model)],
                {"TQ_RESULTS_DIR": str(results), "TQ_CALIBRATION_DIR": str(calibration)})
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (f"suites failed on {model.name} (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    path, data = _results(results)
    return seconds, path, data


def _gates(data: dict) -> list[dict]:
    return [r["labels"] | {"value": r["value"]} for r in data["records"] if r["metric"] == "gate_calibrated"]


# Suites with nothing to run on a CPU (they skip there, saying so): a CUDA graph replay.
CUDA_ONLY_SUITES = {"suites/test_speed_graph.py"}


@pytest.mark.model
def test_a_new_model_runs_every_suite_then_calibrates(tiny_model, tmp_path):
    from harness import identity

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    seconds, path, data = _suites(tiny_model, tmp_path / "first", calibration)
    run, tests = data["run"], data["tests"]
    outcomes = {o: sum(v == o for v in tests.values()) for o in ("passed", "failed", "error", "skipped")}
    print(f"\n{tiny_model.name}: default tier of every suite in {seconds:.0f} s: {outcomes}")

    # No failure, and every suite ran on the model (not only its shape-only cases).
    assert outcomes["failed"] == outcomes["error"] == 0 and not run.get("incomplete"), outcomes
    suites_run = {t.split("::")[0] for t, o in tests.items() if o == "passed"}
    every = {str(p.relative_to(ROOT)) for p in (ROOT / "suites").glob("test_*.py")}
    assert suites_run == every - CUDA_ONLY_SUITES, suites_run
    for name in ("test_perplexity.py::test_perplexity[backend=torch-cpu-config=K4V2+s4w128]",
                 "test_attention.py::test_attention_per_layer[backend=torch-cpu-config=K4V2+s4w128]",
                 "test_needle.py::test_prefill_equivalence[backend=torch-cpu]",
                 "test_needle.py::test_needle_summary[backend=torch-cpu]",
                 "test_generation.py::test_parity_summary[backend=torch-cpu-config=K4V2+s4w128]"):
        assert tests.get(f"suites/{name}") == "passed", (name, tests.get(f"suites/{name}"))
    for suite in ("test_memory.py::test_bytes_held", "test_speed_attention.py::test_decode_attention_per_layer"):
        ours = [o for t, o in tests.items() if t.startswith(f"suites/{suite}[") and f"model={MODEL_NAME}" in t]
        assert ours and "passed" in ours and set(ours) <= {"passed", "skipped"}, (suite, ours)
    skipped_for_the_model = [t for t, o in tests.items() if o == "skipped" and "golden" in t]
    assert len(skipped_for_the_model) == 2  # goldens are the default model's

    # The run names the model it measured, and every record of the model's suites does too.
    assert run["model"] == MODEL_NAME
    assert run["weights_sha256"] == identity.weights_sha256(tiny_model)
    info = run["model_info"]
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (4, 4, 1, 32)
    assert info["layer_types"] == {"sliding_attention": 2, "full_attention": 2}
    for r in data["records"]:
        if r["suite"] in ("perplexity", "generation", "needle", "attention") and r["metric"] != "host_load_1m":
            assert r["labels"].get("model") == MODEL_NAME, r

    # Sliding layers are counted in bytes held (kept by default, encoded with sw=codes) and excluded
    # from the code-level checks.
    mem = [r for r in data["records"] if r["suite"] == "memory" and r["metric"] == "bytes_held"
           and r["labels"]["model"] == MODEL_NAME]
    kept = [r for r in mem if not r["labels"]["config"].endswith("+sw=codes")]
    codes = [r for r in mem if r["labels"]["config"].endswith("+sw=codes")]
    assert kept and all(r["labels"]["layers_compressed"] == 2 and r["labels"]["layers_uncompressed"] == 2 for r in kept)
    assert codes and all(r["labels"]["layers_compressed"] == 4 and r["labels"]["layers_uncompressed"] == 0
                         for r in codes)
    attn_layers = {r["labels"]["layer"] for r in data["records"] if r["metric"] == "attn_cos_mean"}
    assert attn_layers == {1, 3}
    assert {r["labels"].get("prefill") for r in data["records"] if r["suite"] == "needle"} == {"direct"}
    assert {r["labels"].get("prompt_format") for r in data["records"] if r["metric"] == "match_rate"} == {"plain"}

    # Quality gates: uncalibrated (recorded 0, never PASS against another model's band).
    gates = [g for g in _gates(data) if g["gate"] in QUALITY_GATES]
    assert {g["gate"] for g in gates} == QUALITY_GATES
    assert all(g["value"] == 0.0 and g["calibration"] == "none" for g in gates), gates

    # One command calibrates the model from that run ...
    proc = _run(["-m", "suites.calibrate", str(path), "--out", str(calibration), "--model", str(tiny_model)], {})
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((calibration / f"{MODEL_NAME}.json").read_text(encoding="utf-8"))
    assert table["model"]["weights_sha256"] == run["weights_sha256"]
    assert all(table[s] for s in ("perplexity", "attention", "real_mse", "generation", "needle"))
    # ... and refuses a file of another model.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "run": {**run, "model": "another-model"}}), encoding="utf-8")
    proc = _run(["-m", "suites.calibrate", str(other), "--out", str(calibration), "--model", str(tiny_model)], {})
    assert proc.returncode == 2 and "refused" in proc.stderr, proc.stderr

    # A re-run checks the model against its own bands: calibrated, and passing.
    seconds2, _, data2 = _suites(tiny_model, tmp_path / "second", calibration, "suites/test_perplexity.py")
    gates2 = [g for g in _gates(data2) if g["gate"] == "perplexity"]
    print(f"re-run of the perplexity suite in {seconds2:.0f} s: {len(gates2)} gates, "
          f"{sum(g['value'] == 1.0 for g in gates2)} calibrated")
    assert gates2 and all(g["value"] == 1.0 and g["calibration"] == f"{MODEL_NAME}.json" for g in gates2), gates2
    assert all(o in ("passed", "skipped") for o in data2["tests"].values())
