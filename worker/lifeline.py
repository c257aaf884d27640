"""Process-level safeguards that must run before anything heavy is imported.

* The parent-death signal (Linux): a worker is killed the moment its gateway
  dies, even while it is stopped (SIGSTOP) and so cannot see its stdin close.
  Elsewhere the portable rule applies alone: a worker exits when its stdin
  closes.
* A low open-file limit: mlx-lm raises the limit to (2048, 4096) when it is
  imported, which fails where the hard limit is lower and a process may not
  raise it; the worker then died at import, and was restarted in a loop.
  Here the request is clamped to what is allowed, with one clear warning.
* Stray copies of stdin, stdout and stderr: a worker spawned from uvloop
  inherits a second descriptor of each of its stdio sockets. With a copy of
  stdout left open, a worker that closed its protocol output was never seen
  to go (its gateway read on, waiting for a line that could not come).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys

log = logging.getLogger("worker.lifeline")

# The gateway names itself, so a worker whose parent died before the
# parent-death signal was armed can tell.
PARENT_ENV = "MLX_GATEWAY_PARENT_PID"
PR_SET_PDEATHSIG = 1

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]


def die_with_parent() -> bool:
    """Arm the parent-death signal where the platform has one; True if armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    expected = os.environ.get(PARENT_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(0)  # the gateway died before the signal was armed
    return True


def close_stray_stdio() -> int:
    """Close every descriptor above 2 that is another copy of fd 0, 1 or 2;
    the number closed."""
    try:
        stdio = {(st.st_dev, st.st_ino) for st in map(os.fstat, (0, 1, 2))}
    except OSError:
        return 0
    closed = 0
    for fd in _open_fds():
        if fd <= 2:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in stdio:
            with contextlib.suppress(OSError):
                os.close(fd)
                closed += 1
    return closed


def _open_fds() -> list[int]:
    """The process's open descriptors (Linux's /proc, macOS's /dev/fd), else
    the low ones that are checked one by one."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return [int(name) for name in os.listdir(listing) if name.isdigit()]
    return list(range(3, 256))


def tolerate_fd_limit() -> None:
    """Clamp setrlimit(RLIMIT_NOFILE) requests to the hard limit instead of failing."""
    if resource is None or getattr(resource.setrlimit, "_clamped", False):
        return
    original = resource.setrlimit

    def setrlimit(which, limits):
        try:
            return original(which, limits)
        except (ValueError, OSError):
            if which != resource.RLIMIT_NOFILE:
                raise
            _soft, hard = resource.getrlimit(which)
            wanted_soft, wanted_hard = limits
            clamped = (min(wanted_soft, hard), hard)
            log.warning(
                "the open-file limit is %d (hard); mlx-lm asked for %d. Running with %d: "
                "raise the hard limit (ulimit -Hn) if many files must be open at once",
                hard,
                wanted_hard,
                clamped[0],
            )
            with contextlib.suppress(ValueError, OSError):
                original(which, clamped)
            return None

    setrlimit._clamped = True  # type: ignore[attr-defined]
    resource.setrlimit = setrlimit
