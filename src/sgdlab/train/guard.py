"""Fault handling shared by runs and sweeps: stop signals, folder locks, safe checkpoint reading, strict JSON.

* :func:`stop_signals` turns SIGTERM, SIGINT and SIGUSR1 into a request (:func:`stop_requested`) that the
  training loop honours after the current step: it writes a checkpoint and a summary with status
  ``interrupted`` and raises :class:`RunInterrupted`; the CLI then exits with ``128 + signal number``.
* :class:`FolderLock` is an exclusive ``fcntl.flock`` on ``<folder>/.sgdlab.lock`` holding the owner's
  PID and host; the kernel releases it when the process dies, even by SIGKILL.
* :func:`load_checkpoint` reads a checkpoint without running any code from it (``weights_only``), checks
  the zip records' CRC32 first, and turns every failure into one line ("corrupt: ..." or "not an sgdlab
  checkpoint ...").
* :func:`finite_json` replaces non-finite floats by ``None`` so that ``metrics.jsonl`` and ``summary.json``
  stay strict JSON (``null``).

See ``docs/robustness.md``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import socket
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SgdlabError

__all__ = ["RunInterrupted", "FolderLock", "stop_signals", "stop_requested", "request_stop", "exit_code",
           "load_checkpoint", "CheckpointError", "finite_json", "die_with_parent", "STOP_SIGNALS"]

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class RunInterrupted(SgdlabError):
    """A run or sweep stopped on a signal after saving its state; ``signum`` says which signal."""

    def __init__(self, message: str, signum: int, summary: dict | None = None):
        super().__init__(message)
        self.signum = int(signum)
        self.summary = summary


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: missing, a directory, corrupt, or not written by sgdlab."""


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped by ``signum``: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------------------------
# Stop signals
# ------------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {"depth": 0, "signum": None, "saved": {}, "sticky": False, "count": 0}


def _handler(signum, frame):
    _STATE["count"] += 1
    if _STATE["signum"] is None:
        _STATE["signum"] = signum
    elif signum == getattr(signal, "SIGINT", None) and _STATE["count"] >= 3:
        raise KeyboardInterrupt  # a third Ctrl-C: the user wants out now (the last checkpoint is kept)


def stop_requested() -> int | None:
    """The number of the first stop signal received inside :func:`stop_signals`, else None."""
    return _STATE["signum"]


def request_stop(signum: int) -> None:
    """Ask the running loop to stop as if ``signum`` had arrived (used by sweeps and tests)."""
    if _STATE["signum"] is None:
        _STATE["signum"] = int(signum)


def make_sticky() -> None:
    """Keep a received stop request across later runs of this process (sweep workers: a trial handed to a
    worker after the sweep was told to stop must stop at once, not run to its end)."""
    _STATE["sticky"] = True
    install_handlers()


def install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        if s not in _STATE["saved"]:
            _STATE["saved"][s] = signal.getsignal(s)
        signal.signal(s, _handler)


@contextlib.contextmanager
def stop_signals():
    """Within this block SIGTERM/SIGINT/SIGUSR1 set :func:`stop_requested` instead of killing the process.

    Nested blocks share one request; the outermost one installs the handlers (main thread only) and
    restores the previous ones on exit.
    """
    outer = _STATE["depth"] == 0
    if outer:
        if not _STATE["sticky"]:
            _STATE["signum"], _STATE["count"] = None, 0
        install_handlers()
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
        if outer and not _STATE["sticky"] and threading.current_thread() is threading.main_thread():
            for s, h in _STATE["saved"].items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            _STATE["saved"] = {}


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """On Linux, have the kernel send this process ``sig`` when its parent dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


# ------------------------------------------------------------------------------------------------
# Folder locks
# ------------------------------------------------------------------------------------------------

LOCK_NAME = ".sgdlab.lock"


class FolderLock:
    """Exclusive lock of a run or sweep folder for the life of this object (``with FolderLock(d, what):``).

    A second holder gets :class:`~sgdlab.errors.ConfigError` naming the first one's PID and host. The
    lock is an ``fcntl.flock`` (released by the kernel when the holder dies); without ``fcntl``
    (Windows) no lock is taken. The lock file is opened with ``O_NOFOLLOW``: a symbolic link planted in its
    place is refused, so the lock never truncates another file.
    """

    def __init__(self, folder, what: str = "run"):
        self.folder, self.what, self.fd = Path(folder), what, None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        from ..files import open_lock_file

        fd = open_lock_file(self.path)  # never through a planted link: the truncation below would empty its target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid, host = (holder + ["?", "?"])[:2]
            raise ConfigError(f"{self.folder} is in use by another sgdlab {self.what} (PID {pid} on host "
                              f"{host}); wait for it to end or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

# The keys every checkpoint written by the engine holds.
RUN_KEYS = ("step", "elapsed", "best", "model", "optimizer", "scaler", "source", "transforms", "rng")


def load_checkpoint(path, *, require_run: bool = True) -> dict:
    """Read ``path`` without executing anything from it; one-line :class:`CheckpointError` on any failure.

    ``require_run=False`` accepts any mapping of tensors (a plain ``state_dict``) as well as engine
    checkpoints, for ``checkpoint.init_from``.
    """
    import pickle

    import torch

    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, not a checkpoint file")
    if not p.exists():
        raise CheckpointError(f"{p}: no checkpoint there")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: corrupt: the file is empty (0 bytes)")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        raise CheckpointError(f"{p}: not an sgdlab checkpoint (not a torch zip archive; truncated, damaged or "
                              "another kind of file)") from None
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"{p}: corrupt: the archive cannot be read ({type(e).__name__})") from None
    if bad is not None:
        raise CheckpointError(f"{p}: corrupt: record {bad} fails its CRC32 check (damaged on disk)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never pass that on
        raise CheckpointError(f"{p}: not an sgdlab checkpoint (it holds Python objects other than tensors, "
                              "numbers and containers; nothing from it was run)") from None
    except MemoryError:
        raise CheckpointError(f"{p}: corrupt: its records ask for more memory than there is") from None
    except Exception as e:  # noqa: BLE001 - any other failure of a damaged archive
        raise CheckpointError(f"{p}: corrupt: {type(e).__name__} while reading it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: not an sgdlab checkpoint (it holds a {type(state).__name__}, not a mapping)")
    if require_run:
        missing = [k for k in RUN_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{p}: not an sgdlab checkpoint (missing {', '.join(missing)})")
        if not isinstance(state.get("model"), dict) or not isinstance(state.get("optimizer"), dict):
            raise CheckpointError(f"{p}: not an sgdlab checkpoint (model or optimizer is not a state dict)")
    else:
        weights = state.get("model", state)
        if not isinstance(weights, dict) or not weights or \
                not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{p}: not a checkpoint or state_dict of model weights")
    return state


def checkpoint_config(path) -> dict | None:
    """The ``config`` recorded in the checkpoint at ``path``, read without running anything from it and
    without loading its tensors (memory-mapped); None if there is none or the file cannot be read (the full
    :func:`load_checkpoint` then says why)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any damage: the full load reports it
        return None
    return state.get("config") if isinstance(state, dict) and isinstance(state.get("config"), dict) else None


# ------------------------------------------------------------------------------------------------
# Strict JSON
# ------------------------------------------------------------------------------------------------


def finite_json(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, so JSON stays strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def os_error_line(e: OSError) -> str:
    """One line naming the path and the errno text of a filesystem error."""
    where = e.filename if e.filename is not None else "?"
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    return f"{where}: {e.strerror or e}"
