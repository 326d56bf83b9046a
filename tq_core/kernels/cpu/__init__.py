"""Attention over packed TurboQuant codes, and the encode of a decode step's rows, on the CPU: a
small C library compiled on first use.

    attend_codes(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids,
                 *, bits_k, bits_v, length, scale) -> (o_rot, lse)
    encode_into(x, rot_t, boundaries, centroids, *, bits, norm_correction, codes_out, norms_out)
    encode_pair_into(xk, xv, k, v, *, norm_correction)
    attend_step(q, scale, dense, *, q_rot, hist, length, rot_v, ...) -> out   (the whole call)
    available() -> (bool, reason)

The sources (``attend.c``, ``encode.c``, ``step.c``) are compiled with the system C compiler (``$CC``, else ``cc``, ``gcc``,
``clang``) as ``-O3 -march=native -fPIC -shared -pthread -fopenmp -lm``; each flag the compiler
refuses is dropped in turn (``-march=native`` -> ``-mcpu=native`` -> none; ``-fopenmp`` -> pthreads).
``-fopenmp`` is used on Linux only, where the library's ``libgomp.so.1`` is the one torch loaded
(torch is imported first), so the kernel runs on torch's own OpenMP pool. The library goes to
``$TQ_CACHE_DIR/kernels`` (default ``~/.cache/tq-core/kernels``), named by a hash of the source, the
flags, the compiler and its version, and the CPU; it is written to a temporary file and renamed into
place, so concurrent first uses are safe. It ends with a SHA-256 of itself in a 40-byte trailer (ELF
loaders ignore trailing bytes): a truncated or corrupted cached file is rebuilt, never loaded. It is
loaded with ctypes; sizes, strides and addresses are passed as one block of int64. The encode takes
at most ``ENCODE_MAX_ROWS`` rows (a decode step's tokens, where ~25 small array ops per kind cost more
than the work); a prefill's rows stay with the array ops. Nothing here
raises at import: without a compiler, or when the build fails, ``available()`` says why and
``tq_core.ops.attention_kernel`` returns None (``View.attend`` then uses array ops).
``TQ_CPU_KERNEL=0`` turns the kernel off. docs/kernels.md ("CPU") has the design and timings.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..step_args import step_shape

__all__ = ["attend_codes", "attend_step", "encode_into", "encode_pair_into", "available", "library_path", "load"]

SOURCE = Path(__file__).with_name("attend.c")
SOURCES = (SOURCE, Path(__file__).with_name("encode.c"), Path(__file__).with_name("step.c"))
HEADERS = (Path(__file__).with_name("half.h"),)  # included by the sources: part of the build's hash
ENCODE_MAX_ROWS = 64  # rows (batch x KV heads x tokens) an encode call takes: a decode step's
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread")
ARCH_NATIVE = "native"
ABI = 4  # tq_abi() of attend.c
_MAGIC = b"TQKSHA2\0"  # trailer: magic (8 bytes) + sha256 of everything before it (32 bytes)
_ARGS = struct.Struct("=25q9Q")  # tq_attend_codes' argument block: 25 sizes/strides, 9 addresses

_lock = threading.Lock()
_kernels: dict = {}  # (arch, openmp) -> _Kernel, or the error string of a failed build
builds = 0  # compilations run by this process (tests read it)


class BuildError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------- build


def cache_dir() -> Path:
    """``$TQ_CACHE_DIR/kernels`` or ``~/.cache/tq-core/kernels``."""
    root = os.environ.get("TQ_CACHE_DIR") or Path.home() / ".cache" / "tq-core"
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _compiler_version(cc: str) -> str:
    try:
        res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{cc} --version failed: {exc}") from exc
    if res.returncode != 0:
        raise BuildError(f"{cc} --version exited with {res.returncode}: {res.stderr.strip()[:200]}")
    return res.stdout.strip()


def _cpu_id() -> str:
    """What -march=native compiles for: a library built for another CPU must not be loaded."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _flag_sets(arch: str, openmp: bool = True) -> list[tuple[str, ...]]:
    """Flag sets to try in order. OpenMP only on Linux: there the library's libgomp.so.1 resolves to
    the one torch already loaded (same soname), so the kernel runs on torch's own, already spinning
    OpenMP workers instead of competing with them; elsewhere a second OpenMP runtime in the process
    can abort it (libomp refuses to initialize twice), so threads are plain pthreads."""
    archs = [("-march=native",), ("-mcpu=native",), ()] if arch == ARCH_NATIVE else [(f"-march={arch}",)]
    # Apple clang before 15 (and some cross compilers) refuse -march=native; -mcpu=native is the
    # arm64 spelling; the last resort is no CPU flag at all.
    omp = [("-fopenmp",), ()] if openmp and sys.platform.startswith("linux") else [()]
    return [FLAGS + a + o for a in archs for o in omp]


def cached(path: Path, magic: bytes = _MAGIC) -> bool:
    """Whether ``path`` is a whole build: its trailer (``magic`` + sha256 of the rest) checks out."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    n = len(magic) + 32
    return len(data) > n and data[-n:-32] == magic and hashlib.sha256(data[:-n]).digest() == data[-32:]


def build_atomically(path: Path, cmd: list, *, magic: bytes = _MAGIC, input: str | None = None,
                     timeout: int = 300) -> tuple[bool, str | None]:
    """Compile with ``cmd`` (the item ``"{out}"`` stands for the output file) into a temporary file
    beside ``path``, append the trailer ``cached`` checks and rename it into place (a concurrent
    reader sees no file or the whole build). Returns (whether the compiler ran, the error or None).
    Raises OSError when the folder cannot be written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        full = [tmp if c == "{out}" else c for c in cmd]
        try:
            res = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"{' '.join(full)}: {exc}"
        if res.returncode != 0:
            return True, f"{' '.join(full)} exited with {res.returncode}: {res.stderr.strip()[-400:]}"
        data = Path(tmp).read_bytes()
        with open(tmp, "ab") as f:
            f.write(magic + hashlib.sha256(data).digest())
        os.replace(tmp, path)
        return True, None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(arch: str = ARCH_NATIVE, cc: str | None = None, openmp: bool = True) -> Path:
    """The compiled library for ``arch`` (``-march`` value), built now unless a valid cached copy exists.
    ``openmp=False``: threads by pthreads even where OpenMP would be used.

    Raises BuildError (no compiler, compiler error, cache folder not writable).
    """
    global builds
    cc = cc or find_compiler()
    if cc is None:
        raise BuildError("no C compiler found (set $CC or install gcc / clang)")
    src = b"\0".join(f.read_bytes() for f in SOURCES + HEADERS)
    version = _compiler_version(cc)
    folder = cache_dir()
    cpu_id = _cpu_id()
    candidates = []
    for flags in _flag_sets(arch, openmp):
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cc.encode(), version.encode(),
                                         cpu_id.encode()])).hexdigest()[:20]
        candidates.append((flags, folder / f"attend-{key}.so"))
    for _, path in candidates:  # any valid cached build first: a failed flag set is not retried per process
        if cached(path):
            return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the kernel cache folder {folder}: {exc}") from exc
    errors = []
    for flags, path in candidates:
        ran, error = build_atomically(path, [cc, *flags, *map(str, SOURCES), "-o", "{out}", "-lm"])
        builds += ran
        if error is None:
            return path
        errors.append(error)
    raise BuildError("compiling the CPU attention kernel failed: " + " | ".join(errors))


class _Kernel:
    def __init__(self, path: Path):
        self.path = path
        if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
            # torch first: its libgomp.so.1 must be the one the library's libgomp.so.1 resolves to
            # (a system libgomp loaded first could lack symbol versions torch needs).
            import torch  # noqa: F401
        lib = ctypes.CDLL(str(path))
        lib.tq_abi.restype = ctypes.c_int
        lib.tq_isa.restype = ctypes.c_char_p
        lib.tq_openmp.restype = ctypes.c_int
        lib.tq_attend_codes.restype = ctypes.c_int
        lib.tq_attend_codes.argtypes = [ctypes.c_char_p, ctypes.c_double]  # packed int64 arguments
        lib.tq_encode_rows.restype = ctypes.c_int
        lib.tq_encode_rows.argtypes = [ctypes.c_char_p]
        lib.tq_attend_dense.restype = ctypes.c_int
        lib.tq_attend_dense.argtypes = [ctypes.c_char_p, ctypes.c_double]
        if lib.tq_abi() != ABI:
            raise BuildError(f"{path} reports ABI {lib.tq_abi()}, expected {ABI}")
        self.lib = lib
        self.isa = lib.tq_isa().decode()
        self.openmp = bool(lib.tq_openmp())


def load(arch: str = ARCH_NATIVE, openmp: bool = True) -> _Kernel:
    """The loaded kernel for ``arch`` (built on first use, once per process). Raises BuildError."""
    key = (arch, bool(openmp))
    hit = _kernels.get(key)
    if hit is None:
        with _lock:
            hit = _kernels.get(key)
            if hit is None:
                try:
                    path = library_path(arch, openmp=openmp)
                    try:
                        hit = _Kernel(path)
                    except OSError:  # passed the digest but does not load (e.g. foreign file): rebuild once
                        path.unlink(missing_ok=True)
                        hit = _Kernel(library_path(arch, openmp=openmp))
                except (BuildError, OSError) as exc:
                    hit = str(exc) or type(exc).__name__
                _kernels[key] = hit
    if isinstance(hit, str):
        raise BuildError(hit)
    return hit


def available() -> tuple[bool, str]:
    """(True, "<isa> kernel[, OpenMP] at <path>") once the library is built and loaded, else (False, why)."""
    if os.environ.get("TQ_CPU_KERNEL", "1") == "0":
        return False, "CPU attention kernel disabled by TQ_CPU_KERNEL=0"
    try:
        k = load()
    except BuildError as exc:
        return False, str(exc)
    return True, f"{k.isa} kernel{', OpenMP' if k.openmp else ''} at {k.path}"


# ------------------------------------------------------------------------------------- call


def _check_codes(name, codes, norms, B, Hkv, D, bits, length):
    import torch

    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 4:
        raise ValueError(f"{name}_codes must be a (B, Hkv, cap, bytes) uint8 tensor")
    nb = -(-D // 8) * bits
    if codes.shape[0] != B or codes.shape[1] != Hkv or codes.shape[3] != nb:
        raise ValueError(f"{name}_codes must have shape ({B}, {Hkv}, cap, {nb}) for dim={D}, bits={bits}; "
                         f"got {tuple(codes.shape)}")
    if codes.stride(3) != 1:
        raise ValueError(f"{name}_codes must be contiguous along its last axis")
    if (not isinstance(norms, torch.Tensor) or norms.dtype != torch.float16 or norms.dim() != 3
            or tuple(norms.shape) != tuple(codes.shape[:3])):
        raise ValueError(f"{name}_norms must be a float16 tensor of shape {tuple(codes.shape[:3])}")
    if not 0 <= length <= codes.shape[2]:
        raise ValueError(f"length must be in 0..cap={codes.shape[2]}, got {length}")
    if codes.device.type != "cpu" or norms.device.type != "cpu":
        raise ValueError(f"{name}_codes and {name}_norms must be CPU tensors")


def attend_codes(q_rot, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, *,
                 bits_k: int, bits_v: int, length: int, scale: float, out=None, threads: int | None = None,
                 arch: str = ARCH_NATIVE, openmp: bool = True, fast: bool = True):
    """Attention of rotated queries over a packed TurboQuant history, on the CPU.

    Args:
        q_rot: (B, Hq, Tq, D) float32 CPU tensor (16-bit queries are converted), rotated by K's
            rotation (q @ R_k.T); Hq = Hkv * G, query head h reads KV head h // G.
        k_codes, v_codes: (B, Hkv, cap, ceil(D / 8) * bits) uint8, any strides on the first three
            axes, last axis contiguous; only the first ``length`` tokens are read.
        k_norms, v_norms: (B, Hkv, cap) float16 stored norms (any strides).
        k_centroids, v_centroids: (2**bits,) float32 codebooks.
        bits_k, bits_v: code widths, 1..8. length: valid tokens (0..cap). scale: score scale.
        out: optional (o_rot, lse) contiguous float32 tensors of the result shapes to write into.
        threads: worker threads, exactly (default: up to ``torch.get_num_threads()``, fewer when
            there is too little work to pay for starting them: < 16384 (token, KV head) pairs each).
        arch, openmp, fast: which build (``-march`` value; OpenMP or pthreads) and whether the
            vector decoders may be used (tests compare the paths; leave the defaults otherwise).

    Returns:
        o_rot: (B, Hq, Tq, D) float32 = sum_j softmax_j(s) v_norm_j c_v[v_code_j] (V's rotated
            space; zero when length == 0), and lse: (B, Hq, Tq) float32 = logsumexp_j s_j with
            s_j = scale * k_norm_j * <q_rot, c_k[k_code_j]> (-inf when length == 0).
    """
    import torch

    kern = _kernels.get((arch, openmp))
    if kern is None or isinstance(kern, str):
        kern = load(arch, openmp)
    if not isinstance(q_rot, torch.Tensor) or q_rot.dim() != 4 or q_rot.device.type != "cpu":
        raise ValueError("q_rot must be a (B, Hq, Tq, D) CPU tensor")
    for name, bits in (("bits_k", bits_k), ("bits_v", bits_v)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"{name} must be an int in 1..8, got {bits!r}")
    B, Hq, Tq, D = q_rot.shape
    length = int(length)
    Hkv = k_codes.shape[1] if k_codes.dim() == 4 else -1
    _check_codes("k", k_codes, k_norms, B, Hkv, D, bits_k, length)
    _check_codes("v", v_codes, v_norms, B, Hkv, D, bits_v, length)
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if D > 4096 or B * Hq * Tq == 0:
        raise ValueError(f"need D <= 4096 and a non-empty query, got shape {tuple(q_rot.shape)}")
    kc_ = k_centroids.contiguous()
    vc_ = v_centroids.contiguous()
    for name, c, bits in (("k_centroids", kc_, bits_k), ("v_centroids", vc_, bits_v)):
        if c.dim() != 1 or c.numel() != 2 ** bits or c.dtype != torch.float32 or c.device.type != "cpu":
            raise ValueError(f"{name} must be a ({2 ** bits},) float32 CPU tensor")
    if q_rot.dtype != torch.float32:
        q_rot = q_rot.float()
    if q_rot.stride(3) != 1:
        q_rot = q_rot.contiguous()
    if out is None:
        o = torch.empty((B, Hq, Tq, D), dtype=torch.float32)
        lse = torch.empty((B, Hq, Tq), dtype=torch.float32)
    else:
        o, lse = out
        if (tuple(o.shape) != (B, Hq, Tq, D) or tuple(lse.shape) != (B, Hq, Tq) or o.dtype != torch.float32
                or lse.dtype != torch.float32 or not o.is_contiguous() or not lse.is_contiguous()
                or o.device.type != "cpu" or lse.device.type != "cpu"):
            raise ValueError("out must be contiguous float32 CPU tensors of shapes (B, Hq, Tq, D) and (B, Hq, Tq)")
    nthreads = torch.get_num_threads() if threads is None else int(threads)
    args = _ARGS.pack(
        B, Hkv, Hq // Hkv, Tq, D, bits_k, bits_v, length, nthreads, int(bool(fast)) | (2 if threads else 0),
        *q_rot.stride()[:3], *k_codes.stride()[:3], *k_norms.stride(), *v_codes.stride()[:3], *v_norms.stride(),
        q_rot.data_ptr(), k_codes.data_ptr(), k_norms.data_ptr(), v_codes.data_ptr(), v_norms.data_ptr(),
        kc_.data_ptr(), vc_.data_ptr(), o.data_ptr(), lse.data_ptr())
    rc = kern.lib.tq_attend_codes(args, float(scale))
    if rc:
        raise RuntimeError({1: "bad arguments", 2: "out of memory"}.get(rc, f"error {rc}")
                           + " in the CPU attention kernel")
    return o, lse


# ------------------------------------------------------------------------------------- encode

_ENC_DTYPES = {"torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2}
_ENC_HEAD = struct.Struct("=5q")
_ENC_KIND = struct.Struct("=8q6Q")


def symmetric(boundaries, centroids, bits: int) -> bool:
    """The CPU encode counts boundaries below each coordinate whatever the codebook (no symmetric
    shortcut): False, so callers that keep this flag per codebook read the same answer everywhere."""
    return False


def _encode_kind(x, rot_t, boundaries, centroids, bits, codes_out, norms_out) -> bytes:
    import torch

    N, D = x.shape
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    for name, t, shape, dtype in (("rot_t", rot_t, (D, D), torch.float32),
                                  ("boundaries", boundaries, (2 ** bits - 1,), torch.float32),
                                  ("centroids", centroids, (2 ** bits,), torch.float32),
                                  ("codes_out", codes_out, (N, -(-D // 8) * bits), torch.uint8),
                                  ("norms_out", norms_out, (N,), torch.float16)):
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
                or t.device.type != "cpu"):
            raise ValueError(f"{name} must be a {shape} {dtype} CPU tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if name in ("rot_t", "boundaries", "centroids") and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if N and codes_out.stride(1) != 1:
        raise ValueError("codes_out must be contiguous along its last axis")
    return _ENC_KIND.pack(x.stride(0), x.stride(1), codes_out.stride(0), norms_out.stride(0), bits, 0, 0, 0,
                          x.data_ptr(), rot_t.data_ptr(), boundaries.data_ptr(), centroids.data_ptr(),
                          codes_out.data_ptr(), norms_out.data_ptr())


def _encode(xs, kinds, norm_correction: bool) -> None:
    import torch

    x = xs[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError("x must be an (N, D) CPU tensor")
    N, D = x.shape
    if str(x.dtype) not in _ENC_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not 1 <= D <= 1024:
        raise ValueError(f"the CPU encode takes head_dim 1..1024, got {D}")
    if N > ENCODE_MAX_ROWS:
        raise ValueError(f"the CPU encode takes at most ENCODE_MAX_ROWS={ENCODE_MAX_ROWS} rows, got {N}")
    blocks = [_encode_kind(xx, **kind) for xx, kind in zip(xs, kinds)]
    if N == 0:
        return
    kern = _kernels.get((ARCH_NATIVE, True))
    if kern is None or isinstance(kern, str):
        kern = load()
    rc = kern.lib.tq_encode_rows(_ENC_HEAD.pack(N, D, _ENC_DTYPES[str(x.dtype)], int(bool(norm_correction)),
                                                len(blocks)) + b"".join(blocks))
    if rc:
        raise RuntimeError(f"bad arguments (error {rc}) in the CPU encode")


def encode_into(x, rot_t, boundaries, centroids, *, bits: int, norm_correction: bool, codes_out, norms_out,
                is_symmetric: bool | None = None):
    """Encode up to ``ENCODE_MAX_ROWS`` rows of ``x`` (N, D) (float32 / bf16 / fp16 CPU tensor, any
    strides) into ``codes_out`` (N, ceil(D/8) * bits) uint8 (last axis contiguous) and ``norms_out``
    (N,) float16 (any stride), views of a cache's buffers: the same meaning as
    ``TurboQuantizer.encode`` (codes equal up to float32-rounding flips next to a boundary, norms
    within one fp16 ulp; ``encode.c``). ``rot_t`` (D, D) = R.T, ``boundaries``, ``centroids``: float32,
    contiguous. ``is_symmetric`` is accepted for the common signature and not used."""
    _encode([x], [dict(rot_t=rot_t, boundaries=boundaries, centroids=centroids, bits=bits,
                       codes_out=codes_out, norms_out=norms_out)], norm_correction)
    return codes_out, norms_out


def encode_pair_into(xk, xv, k: dict, v: dict, *, norm_correction: bool):
    """Keys and values of the same N rows in one call (``k``/``v``: ``rot_t``, ``boundaries``,
    ``centroids``, ``bits``, ``codes``, ``norms``, as ``encode_into`` takes them; ``symmetric`` is
    ignored): what two ``encode_into`` calls write."""
    if tuple(xk.shape) != tuple(xv.shape) or xk.dtype != xv.dtype:
        raise ValueError(f"xk and xv must have one shape and dtype, got {tuple(xk.shape)} {xk.dtype} and "
                         f"{tuple(xv.shape)} {xv.dtype}")
    _encode([xk, xv], [dict(rot_t=kind["rot_t"], boundaries=kind["boundaries"], centroids=kind["centroids"],
                            bits=kind["bits"], codes_out=kind["codes"], norms_out=kind["norms"])
                       for kind in (k, v)], norm_correction)


# ------------------------------------------------------------------------------------- whole call

_STEP = struct.Struct("=50q11Q")  # tq_attend_dense: 17 sizes/strides + 3 x 11 per segment, 11 addresses


def attend_step(q, scale: float, dense, *, q_rot=None, hist=None, length: int = 0, rot_v=None,
                bits_k: int = 0, bits_v: int = 0, k_centroids=None, v_centroids=None, k_table=None,
                v_table=None, lut=None, length_dev=None, length_base: int = 0, out=None):
    """Attention of ``q`` (B, Hq, Tq, D) over a compressed layer on the CPU, in two C calls: the history
    through ``attend_codes`` (rotated query ``q_rot``, ``hist`` = (k_codes, k_norms, v_codes, v_norms),
    ``length`` tokens), then ``step.c`` over the full-precision tokens ``dense`` = (sinks, window,
    own tokens) as (k, v) pairs (B, Hkv, n, D) or None (any float dtype and strides; the own tokens
    causal among the queries, which are the last ``Tq`` of them), joined by log-sum-exp, the history's
    output rotated back by ``rot_v`` (D, D) float32. The same contract as the CUDA kernels'
    ``attend_step`` (``tq_core.kernels.attention_step`` calls either); ``k_table``, ``v_table``, ``lut``
    are accepted and not used; a device clock (``length_dev``) does not exist here. Returns
    (B, Hq, Tq, D) in ``q``'s dtype (into ``out`` when given)."""
    import torch

    if length_dev is not None:
        raise ValueError("length_dev: the CPU step has no device clock (graph replay is CUDA's)")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.device.type != "cpu":
        raise ValueError("q must be a (B, Hq, Tq, D) CPU tensor")
    B, Hq, Tq, D, Hkv, G = step_shape(q, dense, hist, length)
    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if q.dtype not in codes:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    seg, ptrs = [], []
    for kv in dense:
        if kv is None:
            seg += [0] * 11
            ptrs += [0, 0]
            continue
        k, v = kv
        for x in (k, v):
            if x.dtype not in codes:
                raise ValueError(f"dense tokens must be float32, bfloat16 or float16, got {x.dtype}")
        seg += [k.shape[2], codes[k.dtype], codes[v.dtype], *k.stride(), *v.stride()]
        ptrs += [k.data_ptr(), v.data_ptr()]
    if length:
        if tuple(rot_v.shape) != (D, D) or rot_v.dtype != torch.float32 or not rot_v.is_contiguous():
            raise ValueError(f"rot_v must be a contiguous ({D}, {D}) float32 tensor")
        o_rot, lse = attend_codes(q_rot, *hist, k_centroids, v_centroids, bits_k=bits_k,
                                  bits_v=bits_v, length=int(length), scale=scale)
    else:
        o_rot = lse = rot_v = q  # not read
    if out is None:
        out = torch.empty((B, Hq, Tq, D), dtype=q.dtype)
    elif tuple(out.shape) != (B, Hq, Tq, D) or out.dtype != q.dtype or out.device.type != "cpu":
        raise ValueError(f"out must be a ({B}, {Hq}, {Tq}, {D}) {q.dtype} CPU tensor")
    n_own = 0 if dense[2] is None else dense[2][0].shape[2]
    kern = _kernels.get((ARCH_NATIVE, True))
    if kern is None or isinstance(kern, str):
        kern = load()
    args = _STEP.pack(B, Hkv, G, Tq, D, int(bool(length)), n_own - Tq, codes[q.dtype], codes[out.dtype],
                      *q.stride(), *out.stride(), *seg,
                      q.data_ptr(), out.data_ptr(), o_rot.data_ptr(), lse.data_ptr(), rot_v.data_ptr(), *ptrs)
    rc = kern.lib.tq_attend_dense(args, float(scale))
    if rc:
        raise RuntimeError(f"bad arguments (error {rc}) in the CPU attention step")
    return out
