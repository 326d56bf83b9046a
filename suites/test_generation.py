"""Generation: greedy decoding through the compressed cache vs the uncompressed one, and goldens.

For each (backend, config, prompt) the prompt (``fixtures/prompts.py``, chat template) is decoded
greedily for ``NEW_TOKENS[tier]`` new tokens twice with ``tq_core.generation.generate``: through
the host library's own cache (the baseline) and through the compressed one. Every prompt is
longer than the sinks + window, so part of the history is read back from codes from the first
new token on (asserted: the compressed cache holds codes at the end).

Records, per (backend, config, prompt):

* ``match_rate``: tokens equal at the same position / the longer sequence (``generation.match``).
  Its labels carry both texts, ``text_base`` and ``text_tq`` (first 500 characters), until the
  results file has a place for text.
* ``first_divergence``: index of the first differing new token. When the two sequences are
  identical it is the number of tokens compared (``max(len)``, i.e. "no divergence within N"),
  with the label ``diverged=False``; so the mean over prompts stays a meaningful lower bound.
* ``new_tokens`` / ``new_tokens_baseline``: tokens produced (fewer than asked at end-of-sequence).
* ``cache_bytes`` / ``cache_bytes_baseline`` / ``cache_ratio_vs_baseline``: bytes each cache held
  at the end, measured from its tensors. The baseline is the model's dtype (float32 for the
  default model); mlx-lm's ``KVCache`` allocates in steps of 256 tokens and its bytes are the
  allocation. torch's cache holds prompt + new - 1 tokens, mlx-lm's prompt + new.

Per (backend, config) ``test_parity_summary`` records the mean match rate and first divergence
over the tier's prompts and applies the gate in ``suites/gates.py``; ``test_plain_diverges`` is
the other side: plain K4/V2 (no sinks, no window) must not reproduce the baseline on every prompt.

Goldens: ``fixtures/goldens/generation-<lib>.json`` holds, per backend (``torch-cpu``, ``mlx``,
...) and prompt, the baseline token ids and the default config's (``K4V2``) ids of a
``GOLDEN_TOKENS``-token greedy generation, with the hash of the prompt ids and the weights they
were made with. ``test_golden`` compares today's tokens with the golden's first ``NEW_TOKENS[tier]``
exactly (same backend only; a backend without an entry is skipped) and names the prompt and first
differing index on a mismatch. Regenerate (all prompts, both backends; run without xdist):

    TQ_UPDATE_GOLDENS=1 pytest suites/test_generation.py -k golden --tq-tier nightly --tq-target torch-cpu,mlx

With ``TQ_UPDATE_GOLDENS=1`` the golden tests write (merge into the file) instead of comparing.
Goldens are for the default model only: with ``--tq-model`` they are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import pytest

from fixtures import configs as config_registry
from fixtures import prompts
from fixtures import targets
from suites import gates
from tq_core import generation

NEW_TOKENS = {"default": 48, "nightly": 128}
# Configs compared per tier (the default tier's budget holds the headline config only; the
# others of the tier are skipped there, and all run nightly). Prompts per tier: fixtures/prompts.py.
CONFIGS = {"default": ["K4V2"], "nightly": list(config_registry.CONFIGS)}
PLAIN_TIERS = ("nightly",)  # tiers that run the two-sided plain K4/V2 check
GOLDEN_TOKENS = 128  # goldens hold this many; a tier compares its first NEW_TOKENS[tier]
GOLDEN_CONFIG = "K4V2"  # the compressed config whose tokens the goldens also keep
PLAIN_CONFIG = "K4V2-plain"
GOLDENS = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "goldens"
TEXT_CHARS = 500  # characters of each text kept in the match-rate record's labels
# torch CPU threads while generating: on a 2-core box shared with other jobs, torch's 2-thread
# pool spends most of its time in barriers (measured 4-5x slower than one thread under load).
TORCH_THREADS = 1


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "prompt" in metafunc.fixturenames:
        metafunc.parametrize("prompt", prompts.for_tier(tier), ids=lambda v: f"prompt={v}")
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", ["baseline", GOLDEN_CONFIG], ids=lambda v: f"kind={v}")


@pytest.fixture
def new_tokens(request) -> int:
    return NEW_TOKENS[request.config.getoption("--tq-tier")]


def _config(name: str):
    if name == "baseline":
        return None
    return config_registry.CONFIGS.get(name) or config_registry.PLAIN[name]


# (backend, config name | "baseline", prompt, new tokens) -> (prompt ids, Generation); shared by the
# tests of this module so a baseline is decoded once per (backend, prompt, length).
_GEN: dict = {}


def generate(load_model, backend: str, config_name: str, prompt: str, n: int):
    key = (backend, config_name, prompt, n)
    if key not in _GEN:
        model, tok = load_model(backend)
        ids = prompts.chat_ids(tok, prompts.BY_NAME[prompt].text)
        with targets.torch_threads(TORCH_THREADS, backend):
            _GEN[key] = ids, generation.generate(model, tok, ids, _config(config_name), targets.lib(backend), n)
    return _GEN[key]


@pytest.fixture(scope="module", autouse=True)
def _forget():
    yield
    _GEN.clear()


def compare(backend, config_name, prompt, n, load_model):
    """(prompt ids, baseline Generation, compressed Generation, match rate, first divergence or None)."""
    ids, base = generate(load_model, backend, "baseline", prompt, n)
    _, tq = generate(load_model, backend, config_name, prompt, n)
    rate, first = generation.match(tq.tokens, base.tokens)
    return ids, base, tq, rate, first


def record_pair(record, ids, base, tq, rate, first, **labels) -> dict:
    compared = max(len(base.tokens), len(tq.tokens))
    first_value = compared if first is None else first
    record("match_rate", rate, "", text_base=base.text[:TEXT_CHARS], text_tq=tq.text[:TEXT_CHARS], **labels)
    record("first_divergence", first_value, "token", diverged=first is not None, **labels)
    record("new_tokens", len(tq.tokens), "token", **labels)
    record("new_tokens_baseline", len(base.tokens), "token", **labels)
    record("prompt_tokens", len(ids), "token", **labels)
    record("cache_bytes", tq.cache_nbytes, "B", **labels)
    record("cache_bytes_baseline", base.cache_nbytes, "B", **labels)
    record("cache_ratio_vs_baseline", tq.cache_nbytes / base.cache_nbytes, "x", **labels)
    return {"rate": rate, "first": first_value, "diverged": first is not None}


def check_compressed(config_name, tq, prompt) -> None:
    """The compressed cache really held history as codes (else the comparison measures nothing)."""
    assert tq.tokens, f"{config_name} prompt={prompt}: no token generated"
    assert tq.cache_parts.get("codes", 0) > 0, (
        f"{config_name} prompt={prompt}: the compressed cache holds no codes ({tq.cache_parts}): "
        "the prompt fits in sinks + window and nothing was compressed")


# ---- parity ------------------------------------------------------------------------------------
def skip_unless_measured(config_name: str, tier: str) -> None:
    if config_name not in CONFIGS[tier]:
        pytest.skip(f"{tier} tier compares {', '.join(CONFIGS[tier])} only (time budget); "
                    "--tq-tier nightly runs every config")


def test_parity(backend, config_name, cache_config, prompt, new_tokens, load_model, record, request):
    skip_unless_measured(config_name, request.config.getoption("--tq-tier"))
    ids, base, tq, rate, first = compare(backend, config_name, prompt, new_tokens, load_model)
    check_compressed(config_name, tq, prompt)
    record_pair(record, ids, base, tq, rate, first, config=cache_config.label)
    assert len(ids) > cache_config.sinks + cache_config.window


def test_parity_summary(backend, config_name, cache_config, new_tokens, load_model, record, request):
    tier = request.config.getoption("--tq-tier")
    skip_unless_measured(config_name, tier)
    rates, firsts = [], []
    for prompt in prompts.for_tier(tier):
        _, _, tq, rate, first = compare(backend, config_name, prompt, new_tokens, load_model)
        check_compressed(config_name, tq, prompt)
        rates.append(rate)
        firsts.append(new_tokens if first is None else first)
    labels = dict(config=cache_config.label, prompts=len(rates))
    mean = record("match_rate_mean", sum(rates) / len(rates), "", **labels)
    record("match_rate_min", min(rates), "", **labels)
    record("first_divergence_mean", sum(firsts) / len(firsts), "token", **labels)
    record("full_match_fraction", sum(r == 1.0 for r in rates) / len(rates), "", **labels)
    gates.check_generation(config_name, tier, mean, rates)


def test_plain_diverges(backend, new_tokens, load_model, record, request):
    """Two-sided: the codes alone (no sinks, no window) must change the greedy output somewhere."""
    tier = request.config.getoption("--tq-tier")
    if tier not in PLAIN_TIERS:
        pytest.skip(f"the plain K4/V2 check runs in the {', '.join(PLAIN_TIERS)} tier (time budget)")
    cfg = config_registry.PLAIN[PLAIN_CONFIG]
    rates = []
    for prompt in prompts.for_tier(tier):
        ids, base, tq, rate, first = compare(backend, PLAIN_CONFIG, prompt, new_tokens, load_model)
        check_compressed(PLAIN_CONFIG, tq, prompt)
        record_pair(record, ids, base, tq, rate, first, config_name=PLAIN_CONFIG, config=cfg.label, prompt=prompt)
        rates.append(rate)
    record("match_rate_mean", sum(rates) / len(rates), "", config_name=PLAIN_CONFIG, config=cfg.label,
           prompts=len(rates))
    gates.check_plain_generation(tier, rates)


# ---- goldens -----------------------------------------------------------------------------------
def golden_path(backend: str) -> pathlib.Path:
    return GOLDENS / f"generation-{targets.lib(backend)}.json"


def _ids_sha(ids) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def _read(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _versions(backend: str) -> dict:
    import importlib.metadata as md

    dists = ("torch", "transformers") if targets.lib(backend) == "torch" else ("mlx", "mlx-lm")
    return {d: md.version(d) for d in dists}


def test_golden(backend, prompt, kind, new_tokens, load_model, record, request):
    if request.config.getoption("--tq-model"):
        pytest.skip("goldens are for the default model (--tq-model given)")
    from tq_core import models

    load_model(backend)
    weights = request.config._tq_run.get("weights_sha256") or models.weights_sha256(models.ensure_local(None))
    path = golden_path(backend)
    if os.environ.get("TQ_UPDATE_GOLDENS") == "1":
        ids, gen = generate(load_model, backend, kind, prompt, GOLDEN_TOKENS)
        data = _read(path)
        if data.get("weights_sha256") not in (None, weights):
            data = {}  # goldens of other weights are stale as a whole
        data.update(model="smollm2-135m", weights_sha256=weights, new_tokens=GOLDEN_TOKENS,
                    about="Greedy token ids of suites/test_generation.py; regenerate with TQ_UPDATE_GOLDENS=1 "
                          "(see that module's docstring).")
        entry = data.setdefault("backends", {}).setdefault(backend, {})
        entry["versions"] = _versions(backend)
        p = entry.setdefault("prompts", {}).setdefault(prompt, {})
        if p.get("prompt_sha256") != _ids_sha(ids):
            p.clear()
        p.update(prompt_sha256=_ids_sha(ids), prompt_tokens=len(ids))
        p[kind] = {"tokens": gen.tokens, "text": gen.text, "new_tokens": GOLDEN_TOKENS}
        _write(path, data)
        record("golden_written", len(gen.tokens), "token")
        return

    data = _read(path)
    entry = data.get("backends", {}).get(backend, {}).get("prompts", {}).get(prompt, {})
    if kind not in entry:
        pytest.skip(f"no golden for {backend} prompt={prompt} {kind} in {path.name}: "
                    "write one with TQ_UPDATE_GOLDENS=1 (see suites/test_generation.py)")
    assert data.get("weights_sha256") == weights, (
        f"{path.name} was written for weights {str(data.get('weights_sha256'))[:12]}, the model now is "
        f"{weights[:12]}: regenerate the goldens with TQ_UPDATE_GOLDENS=1")
    ids, gen = generate(load_model, backend, kind, prompt, new_tokens)
    assert entry["prompt_sha256"] == _ids_sha(ids), (
        f"prompt={prompt}: its token ids changed since the golden was written (prompt text or tokenizer); "
        "regenerate the goldens with TQ_UPDATE_GOLDENS=1")
    if entry[kind]["new_tokens"] < new_tokens:
        pytest.skip(f"the golden was generated for {entry[kind]['new_tokens']} tokens, the tier asks for "
                    f"{new_tokens}: regenerate with TQ_UPDATE_GOLDENS=1")
    golden = entry[kind]["tokens"][:new_tokens]  # a generation that stopped early is compared whole
    rate, first = generation.match(gen.tokens, golden)
    record("golden_match_rate", rate, "",
           versions_golden=json.dumps(data["backends"][backend].get("versions", {}), sort_keys=True))
    record("golden_first_divergence", len(golden) if first is None else first, "token")
    if first is not None:
        tok = prompts.hf_tokenizer(load_model(backend)[1])

        def show(seq):
            return f"{seq[first]} {tok.decode([seq[first]])!r}" if first < len(seq) else "end of sequence"

        raise AssertionError(
            f"{backend} {kind} prompt={prompt}: new token {first} differs from the golden "
            f"(golden {show(golden)}, today {show(gen.tokens)}; match rate {rate:.3f}). "
            f"Golden text: {tok.decode(golden[:first + 8])!r}; today: {tok.decode(gen.tokens[:first + 8])!r}. "
            f"Golden versions {data['backends'][backend].get('versions')}, today {_versions(backend)}; "
            "if the change is intended, regenerate with TQ_UPDATE_GOLDENS=1")
