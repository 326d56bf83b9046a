"""CacheConfig (tq_core/config.py): validation, the label grammar and its round trip.

The label is the key everything is filed under (results, gates, reports), so
``CacheConfig.parse(c.label) == c`` must hold for every config, a label must name one config only,
and a bad label must fail with one clear ValueError that names what is wrong.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from tq_core import CacheConfig
from tq_core.config import DEFAULT_METHOD


def _configs():
    """Many configs across both methods, every option, seeds, bit widths, sinks and windows."""
    out = []
    for method, (bk, bv), (s, w), seed in itertools.product(
            ("turboquant", "uniform"), [(1, 1), (4, 2), (2, 4), (3, 3), (8, 8), (8, 1)],
            [(0, 0), (4, 128), (0, 32), (16, 0), (1, 1)], (0, 1, 7, 123456789)):
        out.append(CacheConfig(bits_k=bk, bits_v=bv, sinks=s, window=w, seed=seed, method=method))
    for base in list(out[::7]):
        if base.method == "turboquant":
            out.append(base.replace(norm_correction=False))
        else:
            out += [base.replace(group_size=g) for g in (8, 16, 32, 64)]
    return out


CONFIGS = _configs()


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("config, label", [
    (CacheConfig(), "K4V2+s4w128"),
    (CacheConfig(sinks=0, window=0), "K4V2+s0w0"),
    (CacheConfig(sinks=0, window=0, norm_correction=False), "K4V2+s0w0+nc=0"),
    (CacheConfig(seed=3), "K4V2+s4w128+seed=3"),
    (CacheConfig(seed=3, norm_correction=False), "K4V2+s4w128+seed=3+nc=0"),
    (CacheConfig(bits_k=3, bits_v=8, sinks=1, window=1000), "K3V8+s1w1000"),
    (CacheConfig(method="uniform"), "uniform:K4V2+s4w128"),
    (CacheConfig(method="uniform", group_size=32), "uniform:K4V2+s4w128+g=32"),
    (CacheConfig(method="uniform", group_size=32, seed=5), "uniform:K4V2+s4w128+seed=5+g=32"),
    (CacheConfig(sliding="codes"), "K4V2+s4w128+sw=codes"),
    (CacheConfig(seed=2, sliding="codes", norm_correction=False), "K4V2+s4w128+seed=2+sw=codes+nc=0"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_canonical_labels(config, label):
    assert config.label == label
    assert CacheConfig.parse(label) == config


def test_label_round_trip_many_configs():
    assert len(CONFIGS) > 250
    labels = set()
    for c in CONFIGS:
        back = CacheConfig.parse(c.label)
        assert back == c, (c, c.label, back)
        assert hash(back) == hash(c)
        assert back.label == c.label
        labels.add(c.label)
    # distinct configs have distinct labels: the label is a key
    assert len(labels) == len(set(CONFIGS))


def test_default_method_is_turboquant_and_unnamed():
    assert DEFAULT_METHOD == "turboquant" == CacheConfig().method
    assert not CacheConfig().label.startswith("turboquant:")
    assert CacheConfig.parse("turboquant:K4V2+s4w128") == CacheConfig()


@pytest.mark.parametrize("label, expected", [
    ("K3V2", CacheConfig(bits_k=3, bits_v=2)),  # default sinks and window
    ("uniform:K3V2+g=16", CacheConfig(bits_k=3, bits_v=2, method="uniform", group_size=16)),
    ("  K4V2+s4w128 ", CacheConfig()),  # surrounding blanks
    ("K4V2+s4w128+nc=1", CacheConfig()),  # an option at its default
    ("K4V2+s4w128+seed=0", CacheConfig()),
    ("K4V2+s0w0+nc=0+seed=3", CacheConfig(sinks=0, window=0, seed=3, norm_correction=False)),  # any order
    ("uniform:K4V2+s4w128+g=0", CacheConfig(method="uniform")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_accepted_non_canonical_labels(label, expected):
    assert CacheConfig.parse(label) == expected


def _one_clear_error(label) -> str:
    with pytest.raises(ValueError) as info:
        CacheConfig.parse(label)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    assert repr(label) in msg, msg  # names the label it refused
    assert info.value.__cause__ is None and (info.value.__suppress_context__ or info.value.__context__ is None)
    return msg


@pytest.mark.parametrize("label", ["", "K4", "k4v2", "K4V", "KV2", "K4V2+s4", "K4V2+w128", "K4V2 s4w128",
                                   "K4V2+s4w128+", "K4V2+s4w128+nc", "K4V2+s-1w0", "4V2", "K4V2+s4w128+NC=0",
                                   ":K4V2", "Uniform:K4V2", "K4V2+s4w128;", "K4 V2"])
def test_malformed_label(label):
    msg = _one_clear_error(label)
    assert "is not of the form" in msg and "K4V2+s4w128" in msg  # says what a label looks like


@pytest.mark.parametrize("label, words", [
    ("K9V2", ["bits_k", "1..8", "9"]),
    ("K0V2", ["bits_k", "0"]),
    ("K4V0", ["bits_v", "0"]),
    ("K4V12+s0w0", ["bits_v", "12"]),
    ("foo:K4V2", ["unknown method 'foo'", "turboquant", "uniform"]),
    ("K4V2+g=32", ["unknown option g='32'", "'turboquant'"]),  # an option of another method
    ("uniform:K4V2+nc=0", ["nc", "uniform"]),
    ("K4V2+nc=2", ["nc", "'2'"]),
    ("K4V2+nc=yes", ["nc", "'yes'"]),
    ("uniform:K4V2+g=x", ["g", "'x'"]),
    ("K4V2+seed=-1", ["seed", "'-1'"]),
    ("K4V2+seed=1.5", ["seed", "'1.5'"]),
    ("K4V2+foo=1", ["unknown option foo='1'", "'turboquant'"]),
    ("K4V2+sw=all", ["sw", "keep", "codes", "'all'"]),
    ("quanto:K4V4+s0w0+sw=codes", ["sliding", "quanto"]),
])
def test_bad_label_names_the_problem(label, words):
    msg = _one_clear_error(label)
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("label", ["K4V2+s0w0+seed=1+seed=2", "K4V2+s0w0+nc=0+nc=1",
                                   "uniform:K4V2+g=16+g=32"])
def test_repeated_option_is_refused(label):
    """A label names one config: an option given twice (maybe with two values) is an error, not
    silently the last one."""
    msg = _one_clear_error(label)
    assert "twice" in msg or "repeated" in msg or "more than once" in msg or "duplicate" in msg, msg


@pytest.mark.parametrize("bad", [None, 42, b"K4V2", CacheConfig()])
def test_parse_non_str_is_a_type_error(bad):
    with pytest.raises(TypeError, match="config label must be a str"):
        CacheConfig.parse(bad)


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"bits_k": 9}, ValueError, "bits_k"),
    ({"bits_k": 0}, ValueError, "bits_k"),
    ({"bits_v": 2.0}, TypeError, "bits_v"),
    ({"bits_v": True}, TypeError, "bits_v"),
    ({"bits_k": "4"}, TypeError, "bits_k"),
    ({"sinks": -1}, ValueError, "sinks"),
    ({"window": 1.5}, TypeError, "window"),
    ({"seed": -3}, ValueError, "seed"),
    ({"norm_correction": 1}, TypeError, "norm_correction"),
    ({"group_size": -1, "method": "uniform"}, ValueError, "group_size"),
    ({"method": "nope"}, ValueError, "method"),
    ({"method": None}, ValueError, "method"),
    ({"sliding": "all"}, ValueError, "sliding"),
])
def test_bad_fields(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("make, option, method", [
    (lambda: CacheConfig(method="uniform", norm_correction=False), "norm_correction", "uniform"),
    (lambda: CacheConfig(group_size=32), "group_size", "turboquant"),
    (lambda: CacheConfig(method="turboquant", group_size=8), "group_size", "turboquant"),
    (lambda: CacheConfig(method="uniform").replace(norm_correction=False), "norm_correction", "uniform"),
    (lambda: CacheConfig().replace(group_size=16), "group_size", "turboquant"),
    (lambda: CacheConfig(norm_correction=False).replace(method="uniform"), "norm_correction", "uniform"),
    (lambda: CacheConfig(method="uniform", group_size=16).replace(method="turboquant"), "group_size", "turboquant"),
])
def test_option_of_another_method_is_refused(make, option, method):
    """An option the method does not read would be silently ignored: refused instead."""
    with pytest.raises(ValueError, match=f"{option} is not an option of method '{method}'"):
        make()


def test_replace():
    c = CacheConfig()
    assert c.replace(sinks=0, window=0) == CacheConfig(sinks=0, window=0)
    assert c.replace() == c and c.replace() is not c
    assert c.replace(method="uniform", group_size=16).label == "uniform:K4V2+s4w128+g=16"
    with pytest.raises(TypeError, match="no field 'bits'"):
        c.replace(bits=3)
    with pytest.raises(ValueError, match="bits_v"):
        c.replace(bits_v=9)  # validated like a new config
    assert c == CacheConfig()  # unchanged


def test_frozen_and_hashable():
    c = CacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits_k = 3
    assert {c: 1}[CacheConfig.parse("K4V2+s4w128")] == 1


def test_derived():
    c = CacheConfig(bits_k=4, bits_v=3, sinks=4, window=128)
    assert c.avg_bits == 3.5
    assert c.full_precision == 132
    assert CacheConfig(sinks=0, window=0).full_precision == 0
