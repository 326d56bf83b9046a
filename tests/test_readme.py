"""README opens with the two commands, and CI runs the README's test command verbatim."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("nox -s cpu") and cmds[1].endswith("nox -s tests"), cmds


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def test_nox_oldest_pins_are_the_dependency_floors():
    """`nox -s oldest` installs exactly the lower bounds pyproject.toml declares for numpy and scipy."""
    deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    floors = dict(re.findall(r'"([a-z]+)>=([0-9.]+)"', deps))
    pins = re.search(r"^OLDEST_PINS = \((.*?)\)", (ROOT / "noxfile.py").read_text(), re.M).group(1)
    pinned = dict(re.findall(r'"([a-z]+)==([0-9.]+)"', pins))
    assert set(floors) == set(pinned) == {"numpy", "scipy"}
    for name, floor in floors.items():
        # a floor "1.24" is met exactly by the first release 1.24.x that the pin names
        assert pinned[name].startswith(floor + "."), (name, floor, pinned[name])
