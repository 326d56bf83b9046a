"""Which BLAS MLX uses on Linux CPU.

The Linux ``mlx[cpu]`` wheel links a bundled reference BLAS (netlib): a 512x576x1536 matmul runs
at ~6 GFLOP/s on a 2-core x86 box, against ~170 with OpenBLAS. ``libmlx.so`` leaves exactly three
BLAS symbols for the dynamic linker to resolve: ``cblas_sgemm``, ``cblas_dgemm``, ``cblas_cgemm``.
``use_openblas()`` loads a library that defines them with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
first imported, so the linker binds MLX's calls to it instead of the bundled copy. Unlike
``LD_PRELOAD``, it leaves torch alone (torch binds its own BLAS when imported; a preload, or an
OpenBLAS loaded before torch, takes over torch's float32 GEMV and slows its decoding ~1.4x; so
torch, when installed, is imported first).

Where the library comes from, in order:

1. a system OpenBLAS, the first of ``CANDIDATES`` found (Debian/Ubuntu:
   ``apt-get install libopenblas0-pthread``);
2. else PyPI's ``scipy-openblas32`` wheel (installed by the ``mlx-cpu`` extra on Linux): a
   self-contained pthreads OpenBLAS whose symbols carry a ``scipy_`` prefix. A ~60-line C shim
   (``SHIM_SOURCE``) exports the three unprefixed CBLAS functions and forwards them to the
   ``scipy_`` ones, which its constructor looks up with ``dlopen(RTLD_NOW | RTLD_LOCAL)`` +
   ``dlsym`` on the wheel's library by path (so scipy's own bundled copy of the same prefixed
   symbols is never picked up instead). The shim is compiled on first use with the system C
   compiler (``$CC``, else ``cc``, ``gcc``, ``clang``) into the CPU kernel's cache folder
   (``$TQ_CACHE_DIR/kernels``, default ``~/.cache/tq-core/kernels``; see ``tq_core.kernels.cpu``),
   named by a hash of its source (which embeds the library's path), the flags and the compiler; it
   is written to a temporary file and renamed into place, and carries a SHA-256 trailer, so a
   half-written or corrupted file is never loaded (it is rebuilt);
3. else the wheel's own reference BLAS.

Any failure on the way (no package, no compiler, a build or load error) falls through to the next
option, and ``status()`` keeps the reason.

``TQ_MLX_BLAS`` chooses:

- unset: the order above;
- ``nosystem``: skip the system OpenBLAS (the order above from step 2: what a machine without
  system packages runs; used to measure a fresh start);
- ``scipy``: the ``scipy-openblas32`` shim only; an error if it cannot be built or loaded;
- a path: that library (an error if it does not load);
- ``off``: the wheel's own BLAS.

Nothing happens on macOS (Accelerate/Metal) or once ``mlx.core`` is imported (too late to
change; ``status()`` then says what was in effect). ``status()`` names what is in effect, e.g.
``openblas (/usr/lib/.../libblas.so.3)``, ``scipy-openblas32 0.3.34.481.3 via cblas shim``,
``mlx wheel default (...why...)``; the results record it (``run.mlx_blas``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ENV = "TQ_MLX_BLAS"
HINT = ("install a system OpenBLAS (apt-get install libopenblas0-pthread) or pip install scipy-openblas32 "
        "with a C compiler present; harness/blas.py loads it")
# Debian/Ubuntu (apt-get install libopenblas0-pthread), then the generic sonames.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "libopenblas.so.0",
)
SHIM_PACKAGE = "scipy-openblas32"
SHIM_PREFIX = "scipy_"  # scipy-openblas32 prefixes every exported BLAS symbol
SHIM_FLAGS = ("-O2", "-fPIC", "-shared", "-fvisibility=hidden")
_MAGIC = b"TQBLAS1\0"  # trailer: magic (8 bytes) + sha256 of everything before it (32 bytes)

# The CBLAS ABI of OpenBLAS built with 32-bit ints (scipy-openblas32): enum arguments are ints,
# dimensions int; cgemm's alpha/beta point at complex floats. TQ_BLAS_LIB and TQ_BLAS_PREFIX are
# defined ahead of this text by _shim_source().
SHIM_SOURCE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int, const double *, int,
                         double, double *, int);
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int, const void *, int,
                         const void *, void *, int);

static sgemm_fn p_sgemm;
static dgemm_fn p_dgemm;
static cgemm_fn p_cgemm;
static char error[1024] = "not initialised";
static unsigned long long calls;

/* RTLD_LOCAL + dlsym on this handle: the prefixed symbols come from this library only. */
__attribute__((constructor)) static void tq_blas_shim_init(void) {
    void *h = dlopen(TQ_BLAS_LIB, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(error, sizeof error, "dlopen(%s) failed: %s", TQ_BLAS_LIB, dlerror());
        return;
    }
    sgemm_fn s = (sgemm_fn)dlsym(h, TQ_BLAS_PREFIX "cblas_sgemm");
    dgemm_fn d = (dgemm_fn)dlsym(h, TQ_BLAS_PREFIX "cblas_dgemm");
    cgemm_fn c = (cgemm_fn)dlsym(h, TQ_BLAS_PREFIX "cblas_cgemm");
    if (!s || !d || !c) {
        snprintf(error, sizeof error, "%s lacks %scblas_[sdc]gemm", TQ_BLAS_LIB, TQ_BLAS_PREFIX);
        return;
    }
    p_sgemm = s;
    p_dgemm = d;
    p_cgemm = c;
    error[0] = 0;
}

EXPORT const char *tq_blas_shim_error(void) { return error[0] ? error : NULL; }
EXPORT const char *tq_blas_shim_library(void) { return TQ_BLAS_LIB; }
EXPORT unsigned long long tq_blas_shim_calls(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }

static void unusable(const char *name) {
    fprintf(stderr, "tq cblas shim: %s called but the shim is unusable: %s\n", name, error);
    abort();
}

EXPORT void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                        const float *b, int ldb, float beta, float *c, int ldc) {
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    if (!p_sgemm) unusable("cblas_sgemm");
    p_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

EXPORT void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                        const double *b, int ldb, double beta, double *c, int ldc) {
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    if (!p_dgemm) unusable("cblas_dgemm");
    p_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

EXPORT void cblas_cgemm(int order, int ta, int tb, int m, int n, int k, const void *alpha, const void *a,
                        int lda, const void *b, int ldb, const void *beta, void *c, int ldc) {
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    if (!p_cgemm) unusable("cblas_cgemm");
    p_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

_state: dict = {"status": None, "shim": None}
builds = 0  # shim compilations run by this process (tests read it)


class ShimError(RuntimeError):
    """The scipy-openblas32 shim cannot be used here; the message says why."""


def _preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def _find() -> str | None:
    for path in CANDIDATES:
        if os.path.isabs(path) and os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def _import_torch_first() -> None:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (binds torch to its own BLAS first, see the module docstring)


# ------------------------------------------------------------------------ scipy-openblas32 shim


def shim_library() -> tuple[str, str]:
    """(path of scipy-openblas32's shared library, package version). Raises ShimError."""
    try:
        import scipy_openblas32 as sob
    except ImportError:
        raise ShimError(f"{SHIM_PACKAGE} is not installed (pip install {SHIM_PACKAGE})") from None
    try:
        path = os.path.join(sob.get_lib_dir(), sob.get_library(fullname=True))
    except (OSError, IndexError, AttributeError) as exc:
        raise ShimError(f"{SHIM_PACKAGE} has no shared library: {exc}") from None
    if not os.path.isfile(path):
        raise ShimError(f"{SHIM_PACKAGE}: {path} is missing")
    return os.path.realpath(path), getattr(sob, "__version__", "?")


def _c_string(text: str) -> str:
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c):03o}" for c in text) + '"'


def _shim_source(lib: str) -> str:
    return f"#define TQ_BLAS_LIB {_c_string(lib)}\n#define TQ_BLAS_PREFIX {_c_string(SHIM_PREFIX)}\n{SHIM_SOURCE}"


def _kernel_helpers():
    """The CPU kernel's build helpers (tq_core.kernels.cpu): one compiler search ($CC, cc, gcc,
    clang), cache folder and atomic, digest-checked build for both."""
    try:
        from tq_core.kernels import cpu
    except ImportError as exc:
        raise ShimError(f"tq_core.kernels.cpu does not import: {exc}") from None
    return cpu


def _compiler() -> str | None:
    return _kernel_helpers().find_compiler()


def _cache_dir() -> Path:
    return _kernel_helpers().cache_dir()


def shim_path(lib: str) -> Path:
    """The compiled shim for ``lib``, built now unless a valid cached copy exists. Raises ShimError."""
    global builds
    cc = _compiler()
    if cc is None:
        raise ShimError("no C compiler found (set $CC or install gcc / clang)")
    try:
        res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ShimError(f"{cc} --version failed: {exc}") from None
    if res.returncode != 0:
        raise ShimError(f"{cc} --version exited with {res.returncode}: {res.stderr.strip()[-200:]}")
    source = _shim_source(lib)
    key = hashlib.sha256(b"\0".join([source.encode(), " ".join(SHIM_FLAGS).encode(), cc.encode(),
                                     res.stdout.strip().encode()])).hexdigest()[:20]
    folder = _cache_dir()
    path = folder / f"cblas-shim-{key}.so"
    helpers = _kernel_helpers()
    if helpers.cached(path, _MAGIC):
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # -x c -: the source comes on stdin; -ldl for glibc < 2.34 (a no-op stub library after).
        ran, error = helpers.build_atomically(path, [cc, *SHIM_FLAGS, "-x", "c", "-", "-o", "{out}", "-ldl"],
                                              magic=_MAGIC, input=source, timeout=120)
    except OSError as exc:
        raise ShimError(f"cannot write to the cache folder {folder}: {exc}") from None
    builds += ran
    if error is not None:
        raise ShimError(error)
    return path


def _open_shim(path: Path) -> ctypes.CDLL:
    """Load the shim privately, check its constructor found the library, then make it global."""
    shim = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    shim.tq_blas_shim_error.restype = ctypes.c_char_p
    shim.tq_blas_shim_calls.restype = ctypes.c_ulonglong
    err = shim.tq_blas_shim_error()
    if err:  # still RTLD_LOCAL: its cblas_* never reach MLX
        raise ShimError(err.decode(errors="replace"))
    # Promote to the global scope: MLX's undefined cblas_* bind here when libmlx.so loads.
    ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
    return shim


def load_shim() -> str:
    """Build (or reuse) and load the scipy-openblas32 shim globally; its status. Raises ShimError."""
    lib, version = shim_library()
    path = shim_path(lib)
    try:
        shim = _open_shim(path)
    except OSError:  # passed the digest but does not load (e.g. a foreign file): rebuild once
        path.unlink(missing_ok=True)
        try:
            shim = _open_shim(shim_path(lib))
        except OSError as exc:
            raise ShimError(f"cannot load the cblas shim {path}: {exc}") from None
    _state["shim"] = shim
    return f"{SHIM_PACKAGE} {version} via cblas shim"


def shim_calls() -> int | None:
    """GEMM calls routed through the shim so far in this process (None when it is not loaded)."""
    shim = _state["shim"]
    return None if shim is None else int(shim.tq_blas_shim_calls())


# ------------------------------------------------------------------------------------- choice


def _decide(choice: str) -> str:
    mode = choice.lower()
    if mode == "off":
        return f"mlx wheel default ({ENV}=off)"
    if mode not in ("", "nosystem", "scipy"):  # a path
        _import_torch_first()
        try:
            ctypes.CDLL(choice, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise ValueError(f"{ENV}={choice!r}: cannot load it as a BLAS library ({e}); give a path to an "
                             "OpenBLAS .so, 'nosystem', 'scipy', or 'off'") from None
        return f"openblas ({choice})"
    why = []
    if mode == "":
        path = _find()
        if path:
            _import_torch_first()
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                why.append(f"{path} failed to load")
            else:
                return f"openblas ({path})"
        else:
            why.append("no system OpenBLAS")
    elif mode == "nosystem":
        why.append(f"system OpenBLAS skipped: {ENV}=nosystem")
    _import_torch_first()
    try:
        status = load_shim()
    except ShimError as exc:
        if mode == "scipy":
            raise ValueError(f"{ENV}=scipy: the {SHIM_PACKAGE} cblas shim is unusable: {exc}") from None
        why.append(f"{SHIM_PACKAGE} shim: {exc}")
        return f"mlx wheel default ({'; '.join(why)}; {HINT})"
    return status + (f" ({ENV}={mode})" if mode else "")


def use_openblas() -> str:
    """Give MLX an OpenBLAS if possible (see the module docstring); return what MLX will use (idempotent)."""
    if _state["status"] is not None:
        return _state["status"]
    if not sys.platform.startswith("linux"):
        status = "platform default"
    elif importlib.util.find_spec("mlx") is None:
        status = "mlx not installed"
    elif "mlx.core" in sys.modules:
        status = "mlx wheel default (mlx imported before harness.blas)"
    elif _preloaded():
        status = "openblas (LD_PRELOAD)"
    else:
        status = _decide(os.environ.get(ENV, "").strip())
    _state["status"] = status
    return status


def status() -> str:
    """What ``use_openblas`` decided, or what is in effect if it was never called."""
    if _state["status"] is not None:
        return _state["status"]
    if _preloaded():
        return "openblas (LD_PRELOAD)"
    return "mlx wheel default" if sys.platform.startswith("linux") else "platform default"
