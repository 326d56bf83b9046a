"""Needle in a haystack: passkey retrieval through the compressed cache vs the uncompressed one.

Prompt (``fixtures/prompts.py``; one user turn of the chat template, or plain text when the
tokenizer has no template, label ``prompt_format`` = ``chat`` | ``plain``): an instruction, a
haystack of corpus text with the needle "The pass key is NNNNN. Remember it." on its own line, the
question, and the assistant turn (plain: a blank line) opened with "The pass key is " so the next
tokens are the digits. Pass keys
are 5-digit numbers from an rng seeded by (seed, length, depth). ``length`` is the prompt's
token count; the answer is decoded greedily (at most ``ANSWER_TOKENS``) and counts as retrieved
if the key's digits appear in it.

How the cache is exercised (decode semantics, as a server would):

1. The context (everything up to the question) is prefilled at full precision, as one call
   through a compressed cache would (a chunk attends to itself in full precision). This pass is
   the same for every cache, so it runs once, through the host library's cache, and each
   compressed cache is filled with those K/V layer by layer: what one prefill call through it
   stores (``host.fork``; ``test_prefill_equivalence`` checks this in every compressed layer: bit
   for bit against a real prefill through the compressed cache with the library's attention, to
   float32 rounding against one whose attention reads the method's space, the default). Contexts
   over ``PREFILL_CHUNK`` tokens are prefilled in calls of that size through the host cache (still
   full precision, to bound attention memory); a server that chunks its prefill through the
   compressed cache would read earlier chunks from codes.
2. The question is fed as a second call: it reads the needle as the cache holds it (codes).
   Fed together with the context, the question tokens would read the needle in full precision
   within the chunk and carry it into the full-precision window, and the test would measure
   little compression.
3. The answer is decoded one token at a time.

A model with layers the cache keeps as the host library does (sliding window, chunked or linear
attention: ``ModelSpec.mixed``) cannot be forked -- a sliding layer no longer holds the tokens a
fork would copy -- so each compressed cache is prefilled directly, in the same calls (label
``prefill=direct``; else ``prefill=fork``). Up to ``PREFILL_CHUNK`` tokens that is the same
protocol (``test_prefill_equivalence``); beyond it, later calls read earlier ones from codes.

Depth is the needle's place in the span that the cache holds compressed when the question is
read: 0 % right after the instruction (past the sinks), 100 % ending ``window`` tokens before
the question (snapped back to a line start). The test asserts the needle is past the sinks and
out of the window for every config.

Configs: the tier's ``CONFIGS`` (labels); with ``--tq-config`` / ``--tq-method`` the run's matrix;
on each backend those it can measure (``measurable``: a peer's cache runs in its own host library,
on a model it can hold).

Records per (backend, length, depth) and config (``config=<label>``, ``config=baseline`` for the
host cache): ``passkey_found`` (1/0; labels: ``answer`` text, ``key``, ``prompt_format``, ``model``,
``prefill``), and once ``needle_token`` and ``needle_to_question`` (its distance from the
question). Lengths beyond the model's context (``max_position_embeddings``) are skipped. ``test_needle_summary``
records ``accuracy`` per config (whole grid and per length) with the baseline's beside it, and
applies the gate: compressed retrieves at least what the baseline retrieves minus k
(``suites/gates.py``: the model's calibration table), recorded per config as ``gate_calibrated`` (0: no
limit for that config, tier, backend and model). A 135M model misses some keys even uncompressed, so
absolute accuracy is not gated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import prompts
from harness import hosts
from suites import gates
from tq_core import methods
from tq_core.methods.peer import NO_CODEC

LENGTHS = {"default": [512], "nightly": [512, 1024, 2048, 4096, 8000]}  # model context: 8192
DEPTHS = {"default": [0, 50, 100], "nightly": [0, 25, 50, 75, 100]}  # percent
# Compressed configs per tier, by label (the default tier's budget holds the headline config only).
CONFIGS = {"default": [config_registry.DEFAULT.label], "nightly": list(config_registry.TIERS["nightly"])}
PREFILL_CHUNK = 2048  # context prefill call size (full precision either way; bounds attention memory)
EQUIVALENCE_TOKENS = 200  # corpus tokens of test_prefill_equivalence: one call, 68 of them encoded
ANSWER_TOKENS = 8  # "NNNNN." is 6 tokens after the prefix; decoding stops once the answer is decided
CORPUS_CHARS = 60_000  # enough corpus for ~14k tokens of haystack
SEED = 0
# torch CPU threads: on a 2-core box shared with other jobs, 2 threads spend most of their time in
# barriers (measured 4-5x slower than one thread under load).
TORCH_THREADS = 1
# test_prefill_equivalence against the default attention path (over the codes): float32 rounding of
# the K/V, then (sinks and window) their rounding to the store's 16-bit dtype, which a float32
# difference of one part in 1e6 can move by one 16-bit step. Measured on the default model
# (float32 model, bfloat16 sinks/window, 200 tokens): every element within AUTO_REL of the largest
# |K/V| plus one bfloat16 step of itself (worst 0.995 of that bound), at most 0.4 % of a part's
# elements differing; 1 of 293 760 code bytes flipped.
AUTO_REL = 1e-5  # float32 part: K/V difference / largest |K/V| (measured <= 3.4e-6 before rounding)
AUTO_ELEMENTS = 0.01  # fraction of a sink/window part's elements that may differ
AUTO_CODES = 1e-3  # fraction of code bytes that may flip at a centroid boundary (measured 3.4e-6)


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "length" in metafunc.fixturenames:
        metafunc.parametrize("length", LENGTHS[tier], ids=lambda v: f"length={v}")
    if "depth" in metafunc.fixturenames:
        metafunc.parametrize("depth", DEPTHS[tier], ids=lambda v: f"depth={v}")


# ---- prompt ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    context: list  # ids up to the question (prefilled in one call)
    tail: list  # question + end of turn + answer prefix (second call)
    key: str
    needle_start: int  # token index of the needle in the prompt
    needle_end: int  # one past its last token
    prompt_format: str  # "chat" | "plain"

    @property
    def length(self) -> int:
        return len(self.context) + len(self.tail)


def pass_key(length: int, depth: int) -> str:
    return str(np.random.default_rng([SEED, length, depth]).integers(10_000, 100_000))


def encode(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def turn(tok) -> tuple[list, str, str, str]:
    """(ids that open the prompt, text before the user's message, text after it up to the answer,
    format). With a chat template: one user turn, the generation prompt appended ("chat"). Without
    (base models): the tokenizer's own leading special tokens (e.g. BOS), the message, then
    ``NEEDLE_PLAIN_TURN`` ("plain"), as ``harness.generation.prompt_ids`` falls back."""
    if getattr(tok, "chat_template", None):
        chat = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                       add_generation_prompt=True)
        pre, post = chat.split("\x00")
        return [], pre, post, "chat"
    special = set(tok.all_special_ids)
    lead = list(itertools.takewhile(lambda t: t in special, tok(prompts.NEEDLE_INTRO)["input_ids"]))
    return lead, "", prompts.NEEDLE_PLAIN_TURN, "plain"


def build(tok, hay: tuple[list, list], length: int, depth: int, window: int) -> Case:
    """The case of (length, depth): ``hay`` is (corpus token ids, indices where a line starts)."""
    lead, pre, post, fmt = turn(tok)
    head = lead + encode(tok, pre + prompts.NEEDLE_INTRO)
    tail = encode(tok, prompts.NEEDLE_QUESTION + post + prompts.NEEDLE_ANSWER_PREFIX)
    key = pass_key(length, depth)
    needle = encode(tok, prompts.NEEDLE.format(key=key) + "\n")
    ids, starts = hay
    n_hay = length - len(head) - len(needle) - len(tail)
    if n_hay > len(ids):
        raise ValueError(f"corpus too short for {length} tokens ({len(ids)} tokens of haystack)")
    last = n_hay - window  # latest needle position (in haystack tokens) that leaves it out of the window
    if last < 0:
        raise ValueError(f"length {length} leaves no room for the needle outside a {window}-token window")
    target = round(depth / 100 * last)
    at = max((s for s in starts if s <= target), default=0)
    context = head + ids[:at] + needle + ids[at:n_hay]
    start = len(head) + at
    return Case(context, tail, key, start, start + len(needle), fmt)


def found(text: str, key: str) -> bool:
    return key in text


def decided(text: str, key: str) -> bool:
    """Decoding further cannot change the outcome: the key is there, or a number has ended."""
    return key in text or (any(c.isdigit() for c in text) and not text[-1].isdigit())


# ---- running a case ----------------------------------------------------------------------------
def prefill(host, m, ids, config=None):
    """The host library's cache (or a compressed one for ``config``) after prefilling ``ids`` in
    calls of ``PREFILL_CHUNK`` tokens."""
    cache = host.new_cache(m, config)
    for s in range(0, len(ids), PREFILL_CHUNK):
        host.forward(m, ids[s:s + PREFILL_CHUNK], cache, last_only=True)
    host.sync(host.cache_state(cache))
    return cache


def answer(host, m, cache, tail, key) -> str:
    """Feed the question in one call, then decode greedily until the answer is decided."""
    tok = m.tokenizer
    out = []
    logits = host.forward(m, tail, cache, last_only=True)
    for _ in range(ANSWER_TOKENS):
        t = host.argmax(logits)
        out.append(t)
        if t in tok.all_special_ids or decided(tok.decode(out), key):
            break
        logits = host.forward(m, [t], cache)
    return tok.decode(out, skip_special_tokens=True)


def run_configs(harness, tier: str, config) -> dict:
    """label -> CacheConfig of the compressed caches measured: the tier's, or the run's matrix when
    configs were named (``--tq-config`` / ``--tq-method``)."""
    if config.getoption("--tq-config") or config.getoption("--tq-method"):
        return {c.label: c for c in harness.matrix}
    return {label: config_registry.BY_LABEL[label] for label in CONFIGS[tier]}


class Needle:
    """This module's shared work: the tokenized haystack per (corpus, tokenizer), and each case's
    answers per (backend, length, depth), so the summary reuses what the per-case tests ran.
    ``direct``: prefill each compressed cache itself instead of forking the baseline's (see the
    module docstring)."""

    def __init__(self, direct: bool = False):
        self.direct = direct
        self.hay: dict = {}
        self.runs: dict = {}

    @property
    def prefill_mode(self) -> str:
        return "direct" if self.direct else "fork"

    def haystack(self, tok, corpus) -> tuple[list, list]:
        """(corpus token ids, indices where a line starts)."""
        key = (corpus.sha256, getattr(tok, "name_or_path", None))
        if key not in self.hay:
            ids = encode(tok, corpus.text[:CORPUS_CHARS])
            pieces = tok.batch_decode([[i] for i in ids])
            starts = [i + 1 for i, p in enumerate(pieces) if p.endswith("\n")]
            self.hay[key] = (ids, starts)
        return self.hay[key]

    def run(self, host, m, length: int, depth: int, corpus, configs: dict) -> dict:
        """{"case": Case, "answers": {config label | "baseline": text}}."""
        key = (host.backend, length, depth)
        if key not in self.runs:
            window = max((c.window for c in configs.values()), default=0)
            case = build(m.tokenizer, self.haystack(m.tokenizer, corpus), length, depth, window)
            with host.threads(TORCH_THREADS):
                base = prefill(host, m, case.context)
                answers = {}
                for label, cfg in configs.items():
                    cache = prefill(host, m, case.context, cfg) if self.direct else host.fork(m, base, cfg)
                    answers[label] = answer(host, m, cache, case.tail, case.key)
                # last: the baseline's own question and answer are appended to the cache forked from
                answers["baseline"] = answer(host, m, base, case.tail, case.key)
            self.runs[key] = {"case": case, "answers": answers}
        return self.runs[key]


@pytest.fixture(scope="module")
def needle(real_spec):
    yield Needle(direct=real_spec.mixed)


def skip_beyond_context(spec, length: int) -> None:
    if length + ANSWER_TOKENS > spec.max_context:
        pytest.skip(f"{spec.name} takes at most {spec.max_context} positions; a {length}-token prompt and its "
                    "answer do not fit")


def lengths_within(spec, tier: str) -> list[int]:
    return [n for n in LENGTHS[tier] if n + ANSWER_TOKENS <= spec.max_context]


def measurable(host, m, configs: dict) -> dict:
    """``configs`` less those this host cannot measure on this model: a method of another host library
    or one not installed (``fixtures.configs.runs_on``), a peer whose cache this model cannot hold
    (``tq_core.methods.Unsupported``; the perplexity suite's skips say why)."""
    out = {}
    for label, cfg in configs.items():
        if config_registry.runs_on(cfg, host.lib):
            continue
        try:
            host.new_cache(m, cfg)  # caches allocate on first use: this only asks the method
        except methods.Unsupported:
            continue
        out[label] = cfg
    return out


@pytest.fixture
def configs(harness, tier, request, host, load_model) -> dict:
    return measurable(host, load_model(host.backend), run_configs(harness, tier, request.config))


# ---- tests -------------------------------------------------------------------------------------
def test_needle(host, length, depth, configs, load_model, corpus, needle, real_spec, record):
    skip_beyond_context(real_spec, length)
    run = needle.run(host, load_model(host.backend), length, depth, corpus, configs)
    case, answers = run["case"], run["answers"]
    assert case.length == length
    for label, cfg in configs.items():
        # The needle is read back from codes: past the sinks, and out of the full-precision window
        # when the question (the second call) reads it.
        assert case.needle_start >= cfg.sinks, f"{label}: needle at {case.needle_start} is in the sinks"
        assert case.needle_end <= len(case.context) - cfg.window, (
            f"{label}: needle ends at {case.needle_end}, inside the {cfg.window}-token window of "
            f"{len(case.context)} context tokens")
    labels = dict(prompt_format=case.prompt_format, model=real_spec.name, prefill=needle.prefill_mode)
    record("needle_token", case.needle_start, "token", **labels)
    record("needle_to_question", len(case.context) - case.needle_end, "token", **labels)
    for label, text in answers.items():
        record("passkey_found", float(found(text, case.key)), "", config=label, answer=text, key=case.key, **labels)


def test_needle_summary(host, tier, configs, load_model, corpus, needle, real_spec, model_info, record):
    m = load_model(host.backend)
    lengths = lengths_within(real_spec, tier)
    if not lengths:
        pytest.skip(f"{real_spec.name} takes at most {real_spec.max_context} positions: no length of the "
                    f"{tier} tier ({LENGTHS[tier]}) fits")
    hits = {label: {} for label in ["baseline", *configs]}  # label -> {(length, depth): 0/1}
    formats = set()
    for length in lengths:
        for depth in DEPTHS[tier]:
            run = needle.run(host, m, length, depth, corpus, configs)
            formats.add(run["case"].prompt_format)
            for label, text in run["answers"].items():
                hits[label][length, depth] = int(found(text, run["case"].key))
    common = dict(prompt_format="+".join(sorted(formats)), model=real_spec.name, prefill=needle.prefill_mode)
    # A grid cut short by the model's context is another protocol: its gates would not apply.
    tier_key = tier if lengths == LENGTHS[tier] else f"{tier}:lengths={','.join(map(str, lengths))}"
    if tier_key != tier:
        common["grid"] = tier_key
    n = len(hits["baseline"])
    base_total = sum(hits["baseline"].values())
    for label, h in hits.items():
        total = sum(h.values())
        record("accuracy", total / n, "", config=label, cases=n, **common)
        record("retrieved", total, "case", config=label, cases=n, **common)
        for length in lengths:
            per = [v for (ln, _), v in h.items() if ln == length]
            record("accuracy", sum(per) / len(per), "", config=label, length=length, cases=len(per), **common)
        if label != "baseline":
            record("accuracy_vs_baseline", (total - base_total) / n, "", config=label, cases=n, **common)
            # both retrieved, lost by compression, gained by compression (cases of the grid)
            record("lost_vs_baseline", sum(hits["baseline"][c] and not h[c] for c in h), "case",
                   config=label, cases=n, **common)
    status = gates.check_needle(tier_key, {label: sum(h.values()) for label, h in hits.items()}, n, list(configs),
                                model_info, backend=host.backend)
    for label, s in status.items():
        if s == gates.MEASURED:
            continue  # a peer's cache: measured and reported, never gated
        record("gate_calibrated", float(s == "calibrated"), "bool", gate="needle", config=label,
               calibration=gates.calibration(model_info), **common)


def test_prefill_equivalence(host, configs, load_model, corpus, needle):
    """Forking the baseline's prefill into a compressed cache stores what a real prefill through it
    stores, in every layer the cache compresses (layers it keeps uncompressed have no store).

    Bit for bit against a prefill whose attention reads the call's own K/V through the library's
    attention, as the baseline's does (``attention="reference"``). The default path attends in the
    method's space (``View.attend``): the same numbers up to float32 rounding in layers 1+ (measured
    on the default model: K/V within 3.4e-6 of their largest magnitude, 1 of 293 760 code bytes
    flipped), then rounded to the 16-bit dtype the sinks and window are held in: checked within
    ``AUTO_REL`` of the largest value plus one 16-bit step of each element, on at most
    ``AUTO_ELEMENTS`` of them, and ``AUTO_CODES``. Compressed layers are compared in order; a
    model's other layers (sliding window, ...) hold no codes and are not part of the comparison."""
    cfg = next((c for c in configs.values() if not methods.get(c.method).peer), None)
    if cfg is None:
        pytest.skip(NO_CODEC)  # a peer's cache keeps no layer stores to compare
    m = load_model(host.backend)
    ids = needle.haystack(m.tokenizer, corpus)[0][:EQUIVALENCE_TOKENS]
    assert cfg.sinks + cfg.window < len(ids) <= PREFILL_CHUNK
    direct = {}
    with host.threads(TORCH_THREADS):
        forked = host.fork(m, prefill(host, m, ids), cfg)
        for attention in ("reference", "auto"):
            direct[attention] = host.new_cache(m, cfg, attention=attention)
            host.forward(m, ids, direct[attention], last_only=True)
            host.sync(host.cache_state(direct[attention]))
    a_stores = host.stores(forked)
    for attention, cache in direct.items():
        b_stores = host.stores(cache)
        assert a_stores and len(a_stores) == len(b_stores), (
            f"{cfg.label}: {len(a_stores)} compressed layers forked, {len(b_stores)} prefilled ({attention})")
        differ = total = 0
        for layer, (a, b) in enumerate(zip(a_stores, b_stores)):  # index among the compressed layers
            where = f"compressed layer {layer} ({attention} attention)"
            assert a.length == b.length == len(ids), where
            assert a.encoded_tokens == b.encoded_tokens == len(ids) - cfg.sinks - cfg.window, where
            for part in ("sink_k", "sink_v", "win_k", "win_v"):
                x, y = hosts.to_numpy(getattr(a, part)), hosts.to_numpy(getattr(b, part))
                if attention == "reference":
                    assert np.array_equal(x, y), f"{where}: {part} differs"
                elif part.endswith("_k") and a.center_k is not None:
                    # centered keys (c=1): compared as the keys they stand for; a key held before the
                    # center existed is rounded to 16 bits twice (raw, then centered), and the two
                    # centers differ in float32 order, which may move the rounding of any element:
                    # the bound holds for every one, the share of elements that differ is not checked
                    held = np.maximum(np.abs(x), np.abs(y))
                    x, y = x + hosts.to_numpy(a.center_k), y + hosts.to_numpy(b.center_k)
                    check_rounding(x, y, str(getattr(a, part).dtype), f"{where}: {part} + center", steps=2,
                                   elements=1.0, held=held)
                else:
                    check_rounding(x, y, str(getattr(a, part).dtype), f"{where}: {part}")
            for part in ("hist_k", "hist_v"):
                pa, pb = getattr(a, part).parts(), getattr(b, part).parts()
                assert pa.keys() == pb.keys(), f"{where}: {part} fields {list(pa)} vs {list(pb)}"
                for field in pa:
                    x, y = hosts.to_numpy(pa[field]), hosts.to_numpy(pb[field])
                    if attention == "reference":
                        assert np.array_equal(x, y), f"{where}: {part} {field} differ"
                    elif field == "codes":
                        differ, total = differ + int((x != y).sum()), total + x.size
        if attention == "auto":
            assert differ <= AUTO_CODES * total, (
                f"{cfg.label}: {differ} of {total} code bytes differ from a prefill over the codes "
                f"(> {AUTO_CODES:.1%})")


def step16(x: np.ndarray, dtype: str) -> np.ndarray:
    """One step of a 16-bit float (``dtype`` names it) at each ``|x|``: 2^(exponent - mantissa bits);
    zero for any other dtype (no rounding to allow for)."""
    bits = 7 if "bfloat16" in dtype else 10 if "float16" in dtype else None
    if bits is None:
        return np.zeros_like(x)
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), np.finfo(np.float64).tiny))) - bits)


def check_rounding(x: np.ndarray, y: np.ndarray, dtype: str, where: str, steps: int = 1,
                   elements: float = None, held=None) -> None:
    """``x`` and ``y`` (float64 views of arrays held in ``dtype``) are the same numbers computed in
    another float32 order: within ``AUTO_REL`` of the largest |x| plus ``steps`` steps of ``dtype`` at
    each element (of the larger of |x|, |y| and, given, |held|: the values as held when they
    differ), on at most ``elements`` (default ``AUTO_ELEMENTS``) of the elements."""
    elements = AUTO_ELEMENTS if elements is None else elements
    diff = np.abs(x - y)
    scale = np.maximum(np.abs(x), np.abs(y)) if held is None else np.maximum(np.maximum(np.abs(x), np.abs(y)), held)
    bound = AUTO_REL * np.abs(x).max() + steps * step16(scale, dtype)
    worst = float((diff / bound).max()) if diff.size else 0.0
    assert worst <= 1.0, (f"{where} differs by {float(diff.max()):.3g} (largest |value| {float(np.abs(x).max()):.3g}), "
                          f"{worst:.2f} x the float32 + one {dtype} step bound")
    frac = float((diff > 0).mean()) if diff.size else 0.0
    assert frac <= elements, f"{where}: {frac:.2%} of its elements differ (> {elements:.0%})"
