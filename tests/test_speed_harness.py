"""Rules of the speed harness: under pytest-xdist the speed suites skip with a reason (nothing can be
timed there, and their largest cases would share one device with every other worker), outside xdist
they run; the cache-decode timings are checked for self-contradiction."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import SimpleNamespace

import pytest

_spec = importlib.util.spec_from_file_location("_root_conftest", pathlib.Path(__file__).parents[1] / "conftest.py")
root_conftest = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = root_conftest  # its dataclasses look their module up
_spec.loader.exec_module(root_conftest)


class _Item:
    def __init__(self, path: str, nightly: bool = False):
        self.path = pathlib.Path(path)
        self.keywords = {"nightly": True} if nightly else {}
        self.markers = []

    def add_marker(self, m):
        self.markers.append(m)


def _config(worker: bool, tier: str = "nightly"):
    cfg = SimpleNamespace(getoption=lambda name: {"--tq-tier": tier}[name])
    if worker:
        cfg.workerinput = {"workerid": "gw0"}
    return cfg


@pytest.mark.parametrize("worker", [True, False])
def test_speed_suites_skip_only_under_xdist(worker):
    items = [_Item("suites/test_speed.py"), _Item("suites/test_speed_attention.py"), _Item("suites/test_memory.py")]
    root_conftest.pytest_collection_modifyitems(_config(worker), items)
    skipped = [bool(i.markers) for i in items]
    assert skipped == ([True, True, False] if worker else [False, False, False])
    if worker:
        assert "serial pass" in items[0].markers[0].kwargs["reason"]


def test_nightly_items_still_skip_in_the_default_tier():
    items = [_Item("suites/test_memory.py", nightly=True), _Item("suites/test_memory.py")]
    root_conftest.pytest_collection_modifyitems(_config(False, "default"), items)
    assert [bool(i.markers) for i in items] == [True, False]
    assert "nightly tier only" in items[0].markers[0].kwargs["reason"]


def test_decode_step_consistency_rules():
    """The cache-decode sanity check flags what cannot all be true (the H200 run of b50d1c0's
    baseline: 52 ms per step on 2 layers, 1.75 ms on 32) and lets plausible timings pass."""
    from suites.test_speed import step_contradictions

    assert step_contradictions({(1024, 2): 0.052, (1024, 32): 0.00175})
    assert step_contradictions({(1024, 32): 0.020, (4096, 32): 0.010})
    assert not step_contradictions({(1024, 2): 0.0002, (1024, 32): 0.0018, (4096, 32): 0.0025})
