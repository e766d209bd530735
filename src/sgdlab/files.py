"""Safe file output and names: every file sgdlab writes or locks goes through here.

* :func:`atomic_write` / :func:`write_text` write into a fresh temporary file of the same folder (created
  with ``O_EXCL``, so a planted link at its name is refused, never followed) and :func:`os.replace` it over
  the target. ``rename`` replaces a link at the target itself; it never writes into the file a link points to.
* :func:`open_append` and :func:`open_lock_file` open an existing file with ``O_NOFOLLOW``: a symbolic link
  in its place is one line (:class:`~sgdlab.errors.ConfigError`), not a write into the link's target.
* :func:`check_name` is the one rule for names that become folder or file names (a config's or protocol's
  ``name``, a trial of ``sweep.json``): no path separators, not ``.`` or ``..``, no control characters,
  at most 200 characters.
* :func:`is_existing_path` answers "is this command-line token a file?" without raising for tokens that
  cannot be file names at all (longer than the system allows), so long arguments are read as overrides.

See ``docs/robustness.md`` ("Files sgdlab writes").
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import ConfigError

__all__ = ["MAX_NAME", "atomic_write", "check_name", "is_existing_path", "name_problem", "open_append",
           "open_lock_file", "save_figure", "write_text"]

MAX_NAME = 200
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _link_error(path: Path) -> ConfigError:
    return ConfigError(f"{path}: is a symbolic link; sgdlab does not write through links (remove it)")


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, fsync: bool = False, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO]:
    """``with atomic_write(path) as f:`` writes ``f`` to a new temporary file, then renames it to ``path``.

    The temporary file is created with ``O_EXCL`` under a random name, so nothing existing is followed or
    overwritten; on any failure (a full disk, an exception in the block) it is removed and ``path`` keeps
    its previous content. ``mode`` is ``"w"`` (text) or ``"wb"``; ``fsync=True`` flushes to the disk first.
    """
    path = Path(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    kw = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
    # O_EXCL under a random name: nothing already there is followed
    f = tempfile.NamedTemporaryFile(mode, prefix=f".{path.name[:60]}.", suffix=".tmp",  # noqa: SIM115
                                    dir=path.parent, delete=False, **kw)
    tmp = f.name
    try:
        with f:
            with contextlib.suppress(OSError, AttributeError):
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # the permissions a plain open() would give
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write's error names no file: name the one written
            raise OSError(e.errno, e.strerror, tmp) from None
        raise


def write_text(path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically without following a link there (see :func:`atomic_write`)."""
    with atomic_write(path, "w", fsync=fsync) as f:
        f.write(text)


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig`` into ``path`` through :func:`atomic_write` (the format from the suffix, default PNG)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:].lower() or "png", **kwargs)


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: what FreeBSD says for O_NOFOLLOW on a link
            raise _link_error(path) from None
        raise


def open_append(path) -> IO[str]:
    """``path`` opened for appending text (created if missing), refusing a symbolic link in its place."""
    path = Path(path)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_lock_file(path) -> int:
    """A read-write descriptor of the lock file ``path`` (created if missing), refusing links and non-files."""
    import stat

    path = Path(path)
    fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: is not a regular file; sgdlab only locks with files it creates (remove it)")
    return fd


def name_problem(name) -> str | None:
    """Why ``name`` cannot be a single folder or file name, or None if it can (see :func:`check_name`)."""
    if not isinstance(name, str) or not name:
        return f"must be a non-empty string, got {name!r}"
    if name in (".", ".."):
        return f"{name!r} is not a name (it names a folder itself)"
    if "/" in name or "\\" in name:
        return f"{name!r} holds a path separator; a name is one folder or file name"
    bad = sorted({repr(c) for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        return f"{name[:60]!r} holds control characters ({', '.join(bad)})"
    if len(name) > MAX_NAME:
        return f"{len(name)} characters, at most {MAX_NAME}"
    return None


def check_name(name, what: str) -> str:
    """``name`` if it can be a single folder or file name; else a one-line ConfigError naming ``what``.

    Refused: empty names, ``.`` and ``..``, path separators (``/``, ``\\``), control characters (newlines,
    tabs, NUL, bidirectional overrides, ...) and names over 200 characters.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")
    return name


def is_existing_path(token: str) -> bool:
    """Whether ``token`` names an existing file or folder; False (never an error) for tokens no path can be."""
    try:
        return Path(token).exists()
    except (OSError, ValueError):  # ENAMETOOLONG, embedded NUL, ...
        return False
