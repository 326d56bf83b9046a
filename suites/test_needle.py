"""Needle in a haystack: passkey retrieval through the compressed cache vs the uncompressed one.

Prompt (chat template, one user turn, ``fixtures/prompts.py``): an instruction, a haystack of
corpus text with the needle "The pass key is NNNNN. Remember it." on its own line, the question,
and the assistant turn opened with "The pass key is " so the next tokens are the digits. Pass keys
are 5-digit numbers from an rng seeded by (seed, length, depth). ``length`` is the prompt's
token count; the answer is decoded greedily (at most ``ANSWER_TOKENS``) and counts as retrieved
if the key's digits appear in it.

How the cache is exercised (decode semantics, as a server would):

1. The context (everything up to the question) is prefilled at full precision, as one call
   through a compressed cache would (a chunk attends to itself in full precision). This pass is
   the same for every cache, so it runs once, through the host library's cache, and each
   compressed cache is filled with those K/V layer by layer: what one prefill call through it
   stores (``test_prefill_equivalence`` checks this bit for bit against a real prefill through
   the compressed cache). Contexts over ``PREFILL_CHUNK`` tokens are prefilled in calls of that
   size through the host cache (still full precision, to bound attention memory); a server that
   chunks its prefill through the compressed cache would read earlier chunks from codes.
2. The question is fed as a second call: it reads the needle as the cache holds it (codes).
   Fed together with the context, the question tokens would read the needle in full precision
   within the chunk and carry it into the full-precision window, and the test would measure
   little compression.
3. The answer is decoded one token at a time.

Depth is the needle's place in the span that the cache holds compressed when the question is
read: 0 % right after the instruction (past the sinks), 100 % ending ``window`` tokens before
the question (snapped back to a line start). The test asserts the needle is past the sinks and
out of the window for every config.

Records per (backend, length, depth) and config (``config_name=baseline`` for the host cache):
``passkey_found`` (1/0; labels: ``answer`` text, ``key``), and once ``needle_token`` and
``needle_to_question`` (its distance from the question). ``test_needle_summary`` records
``accuracy`` per config (whole grid and per length) with the baseline's beside it, and applies
the gate: compressed retrieves at least what the baseline retrieves minus k (``suites/gates.py``).
A 135M model misses some keys even uncompressed, so absolute accuracy is not gated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import prompts
from fixtures import targets
from suites import gates

LENGTHS = {"default": [512], "nightly": [512, 1024, 2048, 4096, 8000]}  # model context: 8192
DEPTHS = {"default": [0, 50, 100], "nightly": [0, 25, 50, 75, 100]}  # percent
# Compressed configs per tier (the default tier's budget holds the headline config only).
CONFIGS = {"default": ["K4V2"], "nightly": list(config_registry.CONFIGS)}
PREFILL_CHUNK = 2048  # context prefill call size (full precision either way; bounds attention memory)
EQUIVALENCE_TOKENS = 200  # corpus tokens of test_prefill_equivalence: one call, 68 of them encoded
ANSWER_TOKENS = 8  # "NNNNN." is 6 tokens after the prefix; decoding stops once the answer is decided
CORPUS_CHARS = 60_000  # enough corpus for ~14k tokens of haystack
SEED = 0
# torch CPU threads: on a 2-core box shared with other jobs, 2 threads spend most of their time in
# barriers (measured 4-5x slower than one thread under load).
TORCH_THREADS = 1


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

    @property
    def length(self) -> int:
        return len(self.context) + len(self.tail)


def pass_key(length: int, depth: int) -> str:
    return str(np.random.default_rng([SEED, length, depth]).integers(10_000, 100_000))


_HAY: dict = {}


def haystack(tok, corpus) -> tuple[list, list]:
    """(corpus token ids, indices where a line starts), memoized per corpus."""
    if corpus.sha256 not in _HAY:
        ids = tok(corpus.text[:CORPUS_CHARS], add_special_tokens=False)["input_ids"]
        pieces = tok.batch_decode([[i] for i in ids])
        starts = [i + 1 for i, p in enumerate(pieces) if p.endswith("\n")]
        _HAY[corpus.sha256] = (list(ids), starts)
    return _HAY[corpus.sha256]


def build(tokenizer, corpus, length: int, depth: int, window: int) -> Case:
    tok = prompts.hf_tokenizer(tokenizer)
    chat = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True)
    pre, post = chat.split("\x00")
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    head = enc(pre + prompts.NEEDLE_INTRO)
    tail = enc(prompts.NEEDLE_QUESTION + post + prompts.NEEDLE_ANSWER_PREFIX)
    key = pass_key(length, depth)
    needle = enc(prompts.NEEDLE.format(key=key) + "\n")
    hay, starts = haystack(tok, corpus)
    n_hay = length - len(head) - len(needle) - len(tail)
    if n_hay > len(hay):
        raise ValueError(f"corpus too short for {length} tokens ({len(hay)} tokens of haystack)")
    last = n_hay - window  # latest needle position (in haystack tokens) that leaves it out of the window
    if last < 0:
        raise ValueError(f"length {length} leaves no room for the needle outside a {window}-token window")
    target = round(depth / 100 * last)
    at = max((s for s in starts if s <= target), default=0)
    context = head + hay[:at] + needle + hay[at:n_hay]
    start = len(head) + at
    return Case(context, tail, key, start, start + len(needle))


def found(text: str, key: str) -> bool:
    return key in text


def decided(text: str, key: str) -> bool:
    """Decoding further cannot change the outcome: the key is there, or a number has ended."""
    return key in text or (any(c.isdigit() for c in text) and not text[-1].isdigit())


# ---- running a case ----------------------------------------------------------------------------
def prefill(backend, model, ids):
    """The host library's cache after one prefill call over ``ids``."""
    if targets.lib(backend) == "mlx":
        import mlx.core as mx

        from tq_core.integrations import mlx_lm

        cache = mlx_lm.baseline_cache(model)
        for s in range(0, len(ids), PREFILL_CHUNK):
            model(mx.array([ids[s:s + PREFILL_CHUNK]]), cache=cache)  # logits unevaluated: lm_head never runs
            mx.eval([c.keys_and_values() for c in cache])
        return cache
    import torch

    from tq_core.integrations import hf

    cache = hf.dynamic_cache(model)
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(ids), PREFILL_CHUNK):
            model(input_ids=torch.tensor([ids[s:s + PREFILL_CHUNK]], device=dev), use_cache=True,
                  logits_to_keep=1, **{hf.cache_kwarg(model): cache})
    return cache


def fork(backend, model, base, config):
    """A compressed cache holding what one prefill call through it would: the baseline's K/V."""
    if targets.lib(backend) == "mlx":
        import mlx.core as mx

        from tq_core.integrations import mlx_lm

        cache = mlx_lm.make_cache(model, config)
        for c, b in zip(cache, base):
            c.update_and_fetch(*b.keys_and_values())
        mx.eval([c.state for c in cache])
        return cache
    from tq_core.integrations import hf

    cache = hf.make_cache(model, config)
    for i, layer in enumerate(base.layers):
        cache.update(layer.keys, layer.values, i)
    return cache


def answer(backend, model, tok, cache, tail, key) -> str:
    """Feed the question in one call, then decode greedily until the answer is decided."""
    out = []
    if targets.lib(backend) == "mlx":
        import mlx.core as mx

        logits = model(mx.array([tail]), cache=cache)
        for _ in range(ANSWER_TOKENS):
            t = int(mx.argmax(logits[0, -1]).item())
            out.append(t)
            text = tok.decode(out)
            if t in tok.all_special_ids or decided(text, key):
                break
            logits = model(mx.array([[t]]), cache=cache)
        return tok.decode(out, skip_special_tokens=True)
    import torch

    from tq_core.integrations import hf

    kw = {hf.cache_kwarg(model): cache}
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tail], device=dev), use_cache=True, logits_to_keep=1, **kw).logits
        for _ in range(ANSWER_TOKENS):
            t = int(logits[0, -1].argmax())
            out.append(t)
            if t in tok.all_special_ids or decided(tok.decode(out), key):
                break
            logits = model(input_ids=torch.tensor([[t]], device=dev), use_cache=True, **kw).logits
    return tok.decode(out, skip_special_tokens=True)


def tier_configs(config) -> dict:
    return {name: config_registry.CONFIGS[name] for name in CONFIGS[config.getoption("--tq-tier")]}


# (backend, length, depth) -> {"case": Case, "answers": {config name | "baseline": text}}
_RUNS: dict = {}


def run_case(backend, length, depth, load_model, corpus, configs) -> dict:
    key = (backend, length, depth)
    if key not in _RUNS:
        model, tokenizer = load_model(backend)
        tok = prompts.hf_tokenizer(tokenizer)
        window = max(c.window for c in configs.values())
        case = build(tok, corpus, length, depth, window)
        with targets.torch_threads(TORCH_THREADS, backend):
            base = prefill(backend, model, case.context)
            answers = {}
            for name, cfg in configs.items():
                answers[name] = answer(backend, model, tok, fork(backend, model, base, cfg), case.tail, case.key)
            # last: the baseline's own question and answer are appended to the cache forked from
            answers["baseline"] = answer(backend, model, tok, base, case.tail, case.key)
        _RUNS[key] = {"case": case, "answers": answers}
    return _RUNS[key]


@pytest.fixture(scope="module", autouse=True)
def _forget():
    yield
    _RUNS.clear()
    _HAY.clear()


def arr(x) -> np.ndarray:
    """A torch tensor or mlx array as numpy (same dtype)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.array(x)


# ---- tests -------------------------------------------------------------------------------------
def test_needle(backend, length, depth, load_model, corpus, record, request):
    configs = tier_configs(request.config)
    run = run_case(backend, length, depth, load_model, corpus, configs)
    case, answers = run["case"], run["answers"]
    assert case.length == length
    for name, cfg in configs.items():
        # The needle is read back from codes: past the sinks, and out of the full-precision window
        # when the question (the second call) reads it.
        assert case.needle_start >= cfg.sinks, f"{name}: needle at {case.needle_start} is in the sinks"
        assert case.needle_end <= len(case.context) - cfg.window, (
            f"{name}: needle ends at {case.needle_end}, inside the {cfg.window}-token window of "
            f"{len(case.context)} context tokens")
    record("needle_token", case.needle_start, "token")
    record("needle_to_question", len(case.context) - case.needle_end, "token")
    for name, text in answers.items():
        label = "baseline" if name == "baseline" else configs[name].label
        record("passkey_found", float(found(text, case.key)), "", config_name=name, config=label,
               answer=text, key=case.key)


def test_needle_summary(backend, load_model, corpus, record, request):
    tier = request.config.getoption("--tq-tier")
    configs = tier_configs(request.config)
    hits = {name: {} for name in ["baseline", *configs]}  # name -> {(length, depth): 0/1}
    for length in LENGTHS[tier]:
        for depth in DEPTHS[tier]:
            run = run_case(backend, length, depth, load_model, corpus, configs)
            for name, text in run["answers"].items():
                hits[name][length, depth] = int(found(text, run["case"].key))
    n = len(hits["baseline"])
    base_total = sum(hits["baseline"].values())
    for name, h in hits.items():
        label = "baseline" if name == "baseline" else configs[name].label
        total = sum(h.values())
        record("accuracy", total / n, "", config_name=name, config=label, cases=n)
        record("retrieved", total, "case", config_name=name, config=label, cases=n)
        for length in LENGTHS[tier]:
            per = [v for (ln, _), v in h.items() if ln == length]
            record("accuracy", sum(per) / len(per), "", config_name=name, config=label, length=length,
                   cases=len(per))
        if name != "baseline":
            record("accuracy_vs_baseline", (total - base_total) / n, "", config_name=name, config=label, cases=n)
            # both retrieved, lost by compression, gained by compression (cases of the grid)
            record("lost_vs_baseline", sum(hits["baseline"][c] and not h[c] for c in h), "case",
                   config_name=name, config=label, cases=n)
    gates.check_needle(tier, {name: sum(h.values()) for name, h in hits.items()}, n)


def test_prefill_equivalence(backend, load_model, corpus, request):
    """Forking the baseline's prefill into a compressed cache stores what a real prefill through it stores."""
    configs = tier_configs(request.config)
    _, cfg = next(iter(configs.items()))
    model, tokenizer = load_model(backend)
    tok = prompts.hf_tokenizer(tokenizer)
    ids = haystack(tok, corpus)[0][:EQUIVALENCE_TOKENS]
    assert cfg.sinks + cfg.window < len(ids) <= PREFILL_CHUNK
    with targets.torch_threads(TORCH_THREADS, backend):
        forked = fork(backend, model, prefill(backend, model, ids), cfg)
        if targets.lib(backend) == "mlx":
            import mlx.core as mx

            from tq_core.integrations import mlx_lm

            direct = mlx_lm.make_cache(model, cfg)
            model(mx.array([ids]), cache=direct)
            mx.eval([c.state for c in direct])
            stores = [(a.store, b.store) for a, b in zip(forked, direct)]
        else:
            import torch

            from tq_core.integrations import hf

            direct = hf.make_cache(model, cfg)
            dev = next(model.parameters()).device
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1,
                      **{hf.cache_kwarg(model): direct})
            stores = [(a.store, b.store) for a, b in zip(forked.layers, direct.layers)]

    for layer, (a, b) in enumerate(stores):
        assert a.length == b.length == len(ids)
        assert a.encoded_tokens == len(ids) - cfg.sinks - cfg.window
        for part in ("sink_k", "sink_v", "win_k", "win_v"):
            assert np.array_equal(arr(getattr(a, part)), arr(getattr(b, part))), f"layer {layer}: {part} differs"
        for part in ("hist_k", "hist_v"):
            ea, eb = getattr(a, part), getattr(b, part)
            assert np.array_equal(arr(ea.codes), arr(eb.codes)), f"layer {layer}: {part} codes differ"
            assert np.array_equal(arr(ea.norms), arr(eb.norms)), f"layer {layer}: {part} norms differ"
