"""A fast BLAS under MLX's CPU backend on Linux.

The Linux `mlx[cpu]` wheel carries the reference BLAS, which multiplies float
matrices with plain loops: a 64x576 by 576x1536 product takes 45-60 ms there
and 2-3 ms in OpenBLAS on the same two cores. MLX calls its BLAS through the
standard `cblas_*` symbols, so a BLAS loaded into the process's global symbol
scope before MLX is imported answers those calls instead. This module does
that when the system has OpenBLAS (Debian and Ubuntu: `libopenblas0`; Fedora:
`openblas`), and it must run before anything imports `mlx`: the worker
package's `__init__` calls `preload()`, so importing anything from `worker`
first is enough.

Only float matmuls change; quantized ones are MLX's own kernels, which is why
a quantized model is best run with float weights here (float_weights.py).
On macOS MLX already links Accelerate, so nothing is loaded there.

MLX_GATEWAY_BLAS picks: unset or "auto" (OpenBLAS when found), "off" (the
bundled BLAS), or the path of a BLAS library that exports `cblas_sgemm`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "MLX_GATEWAY_BLAS"
OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so")

# What MLX's float matmuls run on in this process: "accelerate" (macOS),
# "openblas" or a loaded library's path, or "bundled" (the wheel's own).
active = "bundled"
_name: str | None = None  # the name the loaded BLAS was found by
_library: ctypes.CDLL | None = None
_initial_threads: int | None = None  # the BLAS's own thread count, as loaded


def preload() -> str:
    """Load the BLAS MLX_GATEWAY_BLAS asks for into the global symbol scope,
    once and before MLX; returns what MLX's float matmuls will run on."""
    global active, _name, _library, _initial_threads
    if active != "bundled":
        return active
    if sys.platform == "darwin":
        active = "accelerate"
        return active
    choice = os.environ.get(ENV, "auto").strip() or "auto"
    if choice == "off" or not sys.platform.startswith("linux"):
        return active
    if "mlx.core" in sys.modules:
        # Too late: MLX's calls may already be bound to its own BLAS.
        log.warning("%s: mlx was imported first; its float matmuls keep the bundled BLAS", ENV)
        return active
    names = OPENBLAS_NAMES if choice == "auto" else (choice,)
    for name in names:
        try:
            library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if not hasattr(library, "cblas_sgemm"):
            log.warning("%s: %s has no cblas_sgemm; keeping the bundled BLAS", ENV, name)
            continue
        _name, _library = name, library
        _initial_threads = threads()
        active = "openblas" if choice == "auto" else name
        return active
    if choice != "auto":
        log.warning("%s: cannot load %s; keeping the bundled BLAS", ENV, choice)
    return active


def fast() -> bool:
    """Whether MLX's float matmuls on the CPU run on an optimized BLAS."""
    return active != "bundled"


def library_name() -> str | None:
    """The name the loaded BLAS was found by (for another process's
    LD_PRELOAD), or None when MLX keeps its own."""
    return _name


def threads() -> int | None:
    """How many threads the loaded BLAS runs a matmul on, or None where this
    process cannot tell or change it (MLX's own BLAS, Accelerate, a BLAS
    without OpenBLAS's thread calls)."""
    if _library is None or not hasattr(_library, "openblas_get_num_threads"):
        return None
    return int(_library.openblas_get_num_threads())


def initial_threads() -> int | None:
    """The loaded BLAS's thread count before anything changed it (OpenBLAS:
    one per core, or OPENBLAS_NUM_THREADS); None as for threads()."""
    return _initial_threads


def set_threads(n: int) -> None:
    """Run the loaded BLAS's matmuls on `n` threads (threads() is not None)."""
    if _library is None or not hasattr(_library, "openblas_set_num_threads"):
        raise RuntimeError("the BLAS in use has no thread setting")
    _library.openblas_set_num_threads(max(1, int(n)))
