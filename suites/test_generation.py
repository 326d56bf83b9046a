"""Generation: greedy decoding through the compressed cache vs the uncompressed one, and goldens.

For each (backend, config, prompt) the prompt (``fixtures/prompts.py``) is decoded greedily for
``NEW_TOKENS[tier]`` new tokens twice with ``harness.generation.generate``: through the host
library's own cache (the baseline) and through the compressed one. The prompt is one user turn of
the tokenizer's chat template, or the plain text when the tokenizer has none
(``harness.generation.prompt_ids``; label ``prompt_format`` = ``chat`` | ``plain``). Every prompt
is longer than the sinks + window, so part of the history is read back from codes from the first
new token on (asserted: the compressed cache holds encoded history at the end).

Records, per (backend, config, prompt), labels ``config`` (the config's label), ``prompt_format``:

* ``match_rate``: tokens equal at the same position / the longer sequence (``generation.match``).
  Its labels carry both texts, ``text_base`` and ``text_tq`` (first 500 characters), until the
  results file has a place for text.
* ``first_divergence``: index of the first differing new token. When the two sequences are
  identical it is the number of tokens compared (``max(len)``, i.e. "no divergence within N"),
  with the label ``diverged=False``; so the mean over prompts stays a meaningful lower bound.
* ``new_tokens`` / ``new_tokens_baseline``: tokens produced (fewer than asked at end-of-sequence).
* ``cache_bytes`` / ``cache_bytes_baseline`` / ``cache_ratio_vs_baseline``: bytes each cache held
  at the end, measured from its tensors (``host.held_bytes``). The baseline is the model's dtype
  (float32 for the default model); mlx-lm's ``KVCache`` allocates in steps of 256 tokens and its
  bytes are the allocation. torch's cache holds prompt + new - 1 tokens, mlx-lm's prompt + new.

Per (backend, config) ``test_parity_summary`` records the mean match rate and first divergence
over the tier's prompts and applies the gate in ``suites/gates.py`` (recorded as
``gate_calibrated``: 0 when no floor exists for the config, tier and model); ``test_plain_diverges``
is the other side: plain K4/V2 (no sinks, no window) must not reproduce the baseline on every prompt.

Configs: the tier's ``CONFIGS`` (the default tier's budget holds the headline config only) of the
run's matrix; with ``--tq-config`` / ``--tq-method`` the run's matrix as given.

Goldens: ``fixtures/goldens/generation-<lib>.json`` holds, per backend (``torch-cpu``, ``mlx``,
...) and prompt, the baseline token ids and the default config's (key: its label,
``K4V2+s4w128``) ids of a ``GOLDEN_TOKENS``-token greedy generation, with the hash of the prompt
ids and the weights they were made with. ``test_golden`` compares today's tokens with the golden's
first ``NEW_TOKENS[tier]`` exactly (same backend only; a backend without an entry is skipped) and
names the prompt and first differing index on a mismatch. Regenerate (all prompts, both backends;
run without xdist):

    TQ_UPDATE_GOLDENS=1 pytest suites/test_generation.py -k golden --tq-tier nightly --tq-target torch-cpu,mlx

With ``TQ_UPDATE_GOLDENS=1`` the golden tests write (merge into the file) instead of comparing.
Goldens are for the default model only: with ``--tq-model`` naming another model they are skipped.
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
from harness import generation, identity
from suites import gates

NEW_TOKENS = {"default": 48, "nightly": 128}
# Configs compared per tier, by label (the default tier's budget holds the headline config only;
# the others of the tier's matrix are skipped there, and all run nightly). Prompts per tier:
# fixtures/prompts.py.
CONFIGS = {"default": [config_registry.DEFAULT.label], "nightly": list(config_registry.TIERS["nightly"])}
PLAIN_TIERS = ("nightly",)  # tiers that run the two-sided plain K4/V2 check
GOLDEN_TOKENS = 128  # goldens hold this many; a tier compares its first NEW_TOKENS[tier]
GOLDEN_CONFIG = config_registry.DEFAULT  # the compressed config whose tokens the goldens also keep
PLAIN_CONFIG = config_registry.PLAIN  # K4V2+s0w0: the codes alone
GOLDENS = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "goldens"
GOLDEN_MODEL = "smollm2-135m"  # the model the goldens were generated with (the default)
TEXT_CHARS = 500  # characters of each text kept in the match-rate record's labels
# torch CPU threads while generating: on a 2-core box shared with other jobs, torch's 2-thread
# pool spends most of its time in barriers (measured 4-5x slower than one thread under load).
TORCH_THREADS = 1
# Parts of a cache's bytes that are not encoded history (the rest are the method's fields; a peer's
# full-precision ``residual`` window is not encoded either).
NOT_ENCODED = {"sinks", "window", "other", "spare", "uncompressed", "residual", "total"}


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "prompt" in metafunc.fixturenames:
        metafunc.parametrize("prompt", prompts.for_tier(tier), ids=lambda v: f"prompt={v}")
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", ["baseline", GOLDEN_CONFIG.label], ids=lambda v: f"kind={v}")


@pytest.fixture
def new_tokens(tier) -> int:
    return NEW_TOKENS[tier]


class Generations:
    """Greedy generations of this module, shared by its tests so a baseline is decoded once per
    (backend, prompt, length): (backend, config label | "baseline", prompt, new tokens) ->
    (prompt ids, prompt format, Generation)."""

    def __init__(self):
        self.done: dict = {}

    def get(self, host, m, config, prompt: str, n: int):
        key = (host.backend, "baseline" if config is None else config.label, prompt, n)
        if key not in self.done:
            ids, fmt = generation.prompt_ids(m.tokenizer, prompts.BY_NAME[prompt].text)
            with host.threads(TORCH_THREADS):
                self.done[key] = ids, fmt, generation.generate(host, m, ids, config, n)
        return self.done[key]

    def compare(self, host, m, config, prompt: str, n: int):
        """(prompt ids, prompt format, baseline Generation, compressed Generation, match rate,
        first divergence or None)."""
        ids, fmt, base = self.get(host, m, None, prompt, n)
        _, _, tq = self.get(host, m, config, prompt, n)
        rate, first = generation.match(tq.tokens, base.tokens)
        return ids, fmt, base, tq, rate, first


@pytest.fixture(scope="module")
def gens():
    yield Generations()


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


def check_compressed(label, tq, prompt) -> None:
    """The compressed cache really held history encoded (else the comparison measures nothing)."""
    assert tq.tokens, f"{label} prompt={prompt}: no token generated"
    encoded = sum(n for part, n in tq.cache_parts.items() if part not in NOT_ENCODED)
    assert encoded > 0, (
        f"{label} prompt={prompt}: the compressed cache holds no encoded history ({tq.cache_parts}): "
        "the prompt fits in sinks + window and nothing was compressed")


# ---- parity ------------------------------------------------------------------------------------
def skip_unless_measured(label: str, tier: str, request) -> None:
    if request.config.getoption("--tq-config") or request.config.getoption("--tq-method"):
        return  # configs asked for by name are measured whatever the tier
    if label not in CONFIGS[tier]:
        pytest.skip(f"{tier} tier compares {', '.join(CONFIGS[tier])} only (time budget); "
                    "--tq-tier nightly runs every config")


def skip_unless_compressed(m, config, prompt: str) -> None:
    """A prompt that fits in sinks + window under this model's tokenizer compresses nothing: the
    comparison cannot apply to it (the default model's prompts are all longer)."""
    ids, _ = generation.prompt_ids(m.tokenizer, prompts.BY_NAME[prompt].text)
    if len(ids) <= config.sinks + config.window:
        pytest.skip(f"prompt={prompt} is {len(ids)} tokens under this model's tokenizer: it fits in "
                    f"{config.sinks} sinks + {config.window} window, nothing would be held as codes")


def test_parity(host, cache_config, prompt, new_tokens, tier, load_model, gens, real_spec, record, request):
    skip_unless_measured(cache_config.label, tier, request)
    m = load_model(host.backend)
    skip_unless_compressed(m, cache_config, prompt)
    ids, fmt, base, tq, rate, first = gens.compare(host, m, cache_config, prompt, new_tokens)
    check_compressed(cache_config.label, tq, prompt)
    record_pair(record, ids, base, tq, rate, first, config=cache_config.label, prompt_format=fmt,
                model=real_spec.name)
    assert len(ids) > cache_config.sinks + cache_config.window


def test_parity_summary(host, cache_config, new_tokens, tier, load_model, gens, real_spec, model_info, record,
                        request):
    skip_unless_measured(cache_config.label, tier, request)
    m = load_model(host.backend)
    rates, firsts, formats = [], [], set()
    for prompt in prompts.for_tier(tier):
        skip_unless_compressed(m, cache_config, prompt)
        _, fmt, _, tq, rate, first = gens.compare(host, m, cache_config, prompt, new_tokens)
        check_compressed(cache_config.label, tq, prompt)
        rates.append(rate)
        firsts.append(new_tokens if first is None else first)
        formats.add(fmt)
    labels = dict(config=cache_config.label, prompts=len(rates), prompt_format="+".join(sorted(formats)),
                  model=real_spec.name)
    mean = record("match_rate_mean", sum(rates) / len(rates), "", **labels)
    record("match_rate_min", min(rates), "", **labels)
    record("first_divergence_mean", sum(firsts) / len(firsts), "token", **labels)
    record("full_match_fraction", sum(r == 1.0 for r in rates) / len(rates), "", **labels)
    status = gates.check_generation(cache_config.label, tier, mean, rates, model_info, backend=host.backend)
    if status == gates.MEASURED:
        return  # a peer's cache: measured and reported, never gated
    record("gate_calibrated", float(status == "calibrated"), "bool", gate="generation", config=cache_config.label,
           model=real_spec.name, calibration=gates.calibration(model_info))


def test_plain_diverges(host, new_tokens, tier, load_model, gens, real_spec, record):
    """Two-sided: the codes alone (no sinks, no window) must change the greedy output somewhere."""
    if tier not in PLAIN_TIERS:
        pytest.skip(f"the plain K4/V2 check runs in the {', '.join(PLAIN_TIERS)} tier (time budget)")
    m = load_model(host.backend)
    label = PLAIN_CONFIG.label
    rates, formats = [], set()
    for prompt in prompts.for_tier(tier):
        ids, fmt, base, tq, rate, first = gens.compare(host, m, PLAIN_CONFIG, prompt, new_tokens)
        check_compressed(label, tq, prompt)
        record_pair(record, ids, base, tq, rate, first, config=label, prompt=prompt, prompt_format=fmt,
                    model=real_spec.name)
        rates.append(rate)
        formats.add(fmt)
    record("match_rate_mean", sum(rates) / len(rates), "", config=label, prompts=len(rates),
           prompt_format="+".join(sorted(formats)), model=real_spec.name)
    gates.check_plain_generation(tier, rates)


# ---- goldens -----------------------------------------------------------------------------------
def golden_path(host) -> pathlib.Path:
    return GOLDENS / f"generation-{host.lib}.json"


def _config(kind: str):
    return None if kind == "baseline" else config_registry.BY_LABEL[kind]


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


def test_golden(host, prompt, kind, new_tokens, load_model, gens, harness, record, request):
    model = identity.model_id(request.config.getoption("--tq-model"))
    if model != GOLDEN_MODEL:
        pytest.skip(f"goldens are for the default model ({GOLDEN_MODEL}); this run measures {model}")
    from tq_core import models

    backend = host.backend
    m = load_model(backend)
    weights = harness.run.get("weights_sha256") or identity.weights_sha256(models.ensure_local(None))
    path = golden_path(host)
    if os.environ.get("TQ_UPDATE_GOLDENS") == "1":
        ids, fmt, gen = gens.get(host, m, _config(kind), prompt, GOLDEN_TOKENS)
        data = _read(path)
        if data.get("weights_sha256") not in (None, weights):
            data = {}  # goldens of other weights are stale as a whole
        data.update(model=GOLDEN_MODEL, weights_sha256=weights, new_tokens=GOLDEN_TOKENS,
                    about="Greedy token ids of suites/test_generation.py; regenerate with TQ_UPDATE_GOLDENS=1 "
                          "(see that module's docstring).")
        entry = data.setdefault("backends", {}).setdefault(backend, {})
        entry["versions"] = host.versions()
        p = entry.setdefault("prompts", {}).setdefault(prompt, {})
        if p.get("prompt_sha256") != _ids_sha(ids):
            p.clear()
        p.update(prompt_sha256=_ids_sha(ids), prompt_tokens=len(ids), prompt_format=fmt)
        p[kind] = {"tokens": gen.tokens, "text": gen.text, "new_tokens": GOLDEN_TOKENS}
        _write(path, data)
        record("golden_written", len(gen.tokens), "token", prompt_format=fmt)
        return

    data = _read(path)
    entry = data.get("backends", {}).get(backend, {}).get("prompts", {}).get(prompt, {})
    if kind not in entry:
        pytest.skip(f"no golden for {backend} prompt={prompt} {kind} in {path.name}: "
                    "write one with TQ_UPDATE_GOLDENS=1 (see suites/test_generation.py)")
    assert data.get("weights_sha256") == weights, (
        f"{path.name} was written for weights {str(data.get('weights_sha256'))[:12]}, the model now is "
        f"{weights[:12]}: regenerate the goldens with TQ_UPDATE_GOLDENS=1")
    ids, fmt, gen = gens.get(host, m, _config(kind), prompt, new_tokens)
    assert entry["prompt_sha256"] == _ids_sha(ids), (
        f"prompt={prompt}: its token ids changed since the golden was written (prompt text, format "
        f"{fmt} or tokenizer); regenerate the goldens with TQ_UPDATE_GOLDENS=1")
    if entry[kind]["new_tokens"] < new_tokens:
        pytest.skip(f"the golden was generated for {entry[kind]['new_tokens']} tokens, the tier asks for "
                    f"{new_tokens}: regenerate with TQ_UPDATE_GOLDENS=1")
    golden = entry[kind]["tokens"][:new_tokens]  # a generation that stopped early is compared whole
    rate, first = generation.match(gen.tokens, golden)
    versions = data["backends"][backend].get("versions", {})
    record("golden_match_rate", rate, "", versions_golden=json.dumps(versions, sort_keys=True), prompt_format=fmt)
    record("golden_first_divergence", len(golden) if first is None else first, "token", prompt_format=fmt)
    if first is not None:
        tok = m.tokenizer

        def show(seq):
            return f"{seq[first]} {tok.decode([seq[first]])!r}" if first < len(seq) else "end of sequence"

        raise AssertionError(
            f"{backend} {kind} prompt={prompt}: new token {first} differs from the golden "
            f"(golden {show(golden)}, today {show(gen.tokens)}; match rate {rate:.3f}). "
            f"Golden text: {tok.decode(golden[:first + 8])!r}; today: {tok.decode(gen.tokens[:first + 8])!r}. "
            f"Golden versions {versions}, today {host.versions()}; "
            "if the change is intended, regenerate with TQ_UPDATE_GOLDENS=1")
