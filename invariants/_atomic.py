"""Owns the one way the harness writes a file: atomically, with the target's mode, or not at all.

Every file the tool writes (golden JSON, ``.obtained.json``, the golden-vs-obtained plot, the
``scan --plot`` PNG) goes through ``write_bytes_atomic``:

1. the target is resolved and judged first: a regular file or a missing name is written; a
   symlink is *written through* to the regular file it names (the link itself stays a link,
   the file it points to is replaced atomically; the temp file lives beside that real file,
   so the rename never crosses file systems); a dangling or looping symlink, a directory, a
   FIFO, a socket or a device node is refused with ``AtomicWriteError`` and never replaced;
2. the bytes go to a fresh temp file ``.<target name>.<8 hex>.invariants-tmp`` in the real
   target's directory (``TEMP_PATTERN``; the repository's ``.gitignore`` covers it), created
   with ``O_EXCL`` and mode ``0o666`` so the kernel applies the umask (``mkstemp``'s 0600 is
   not used); an existing target's permission bits are copied onto it (not its owner: only
   root could chown);
3. written with ``os.write`` (short writes continued), ``os.fsync``, closed, ``os.replace``d
   over the target, then the directory is fsynced (best effort);
4. on any failure, ``KeyboardInterrupt`` included, the temp file is removed and the target is
   left as it was; an ``OSError`` becomes ``AtomicWriteError`` naming the file and the reason,
   anything else propagates unchanged.

What it does not promise: the check of the target and the rename are two steps, so a file
swapped in between by another process is replaced; extended attributes and ACLs of the old
file are not copied.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from invariants._errors import InvalidArgumentError

__all__ = ["TEMP_PATTERN", "AtomicWriteError", "file_kind", "temp_name", "write_bytes_atomic"]

#: the shell glob every temp file matches (``.gitignore`` lists it)
TEMP_PATTERN = ".*.invariants-tmp"
_SUFFIX = ".invariants-tmp"
_NAME_MAX = 255  # bytes in one path component on Linux/macOS file systems


class AtomicWriteError(InvalidArgumentError):
    """A file could not be written; the target is unchanged and no temp file is left.

    ``str(error)`` is ``"<path>: <problem>"``; ``path`` and ``problem`` are kept apart for
    callers that name the file their own way (``--plot='x.png': cannot write the plot (...)``).
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


def temp_name(target: str | os.PathLike) -> str:
    """A fresh temp-file name for ``target`` (same directory), matching ``TEMP_PATTERN``."""
    tag = secrets.token_hex(4)
    room = _NAME_MAX - len(f"..{tag}{_SUFFIX}")
    base = os.fsencode(Path(target).name)[:room].decode(errors="ignore")
    return f".{base}.{tag}{_SUFFIX}"


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for messages that refuse it)."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _resolve(path: Path) -> tuple[Path, int | None]:
    """The file to replace and the permission bits to keep (``None``: a new file)."""
    real = path
    if path.is_symlink():
        try:
            real = Path(os.path.realpath(path, strict=True))
        except OSError as exc:
            raise AtomicWriteError(path, f"is a symlink to a missing file or a symlink loop "
                                   f"({_reason(exc)}); refusing to write through it") from None
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if not real.parent.is_dir():
            raise AtomicWriteError(path, f"directory {str(real.parent)!r} does not exist") from None
        return real, None
    except OSError as exc:
        raise AtomicWriteError(path, f"cannot inspect the target ({_reason(exc)})") from None
    if not stat.S_ISREG(st.st_mode):
        via = "" if real == path else f"a symlink to {real}, which "
        raise AtomicWriteError(path, f"{via}is a {file_kind(st.st_mode)}, not a regular file; "
                               "refusing to replace it")
    return real, stat.S_IMODE(st.st_mode)


def _create_temp(real: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = real.parent / temp_name(real)
        try:
            return os.open(tmp, flags, 0o666), tmp  # the umask applies, as for any new file
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {real}")  # pragma: no cover


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; return the file actually written.

    Raises:
      AtomicWriteError: the target is not a regular file (or a symlink to one), its directory
        does not exist, or the file system refused (disk full, permission denied, I/O error);
        the message names the file and the reason, and says the old file is unchanged.
    """
    path = Path(path)
    real, mode = _resolve(path)
    tmp: Path | None = None
    try:
        fd, tmp = _create_temp(real)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            unchanged = "the old file is unchanged" if mode is not None else "nothing was written"
            raise AtomicWriteError(path, f"cannot write ({_reason(exc)}); {unchanged}") from None
        raise
    _fsync_directory(real.parent)
    return real
