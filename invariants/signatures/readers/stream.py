"""Owns getting bytes in: files, ``-`` (stdin), pipes and ``/dev/fd/N`` read whole, once.

``open_source(path)`` gives a ``Source``: a buffered binary stream whose ``peek``
sniffs the format without consuming a byte (the old reader read 4 KB of a pipe to
sniff and lost them).  ``Source.chunks`` yields newline-terminated blocks of about
``CHUNK_BYTES`` with the 1-based number of their first line, so readers can stream
with bounded memory and still name ``FILE:LINE``.  A line longer than
``MAX_LINE_BYTES`` is an error naming that line (a 2 GB file without a newline
used to be read whole before failing).  A UTF-8 byte-order mark at the start is
dropped.
"""
from __future__ import annotations

import io
import os
import stat
import sys
from typing import BinaryIO, Iterator

from invariants._errors import InvalidArgumentError

CHUNK_BYTES = 4 << 20       # a block handed to the native parser (bounded memory)
MAX_LINE_BYTES = 16 << 20   # one log line (one JSON record or CSV row) at most
PEEK_BYTES = 64 << 10
BOM = b"\xef\xbb\xbf"


class LogError(InvalidArgumentError):
    """``FILE[:LINE]: problem`` for a log that cannot be read."""


def err(path: str, line: int | None, problem: str) -> LogError:
    where = f"{path}:{line}" if line is not None else path
    exc = LogError(f"{where}: {problem}")
    exc.path = path
    return exc


def short(x: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: an error never echoes a megabyte value."""
    return cut(repr(x), limit)


def cut(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, marked with ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_stream(path: str) -> bool:
    """``-``, a pipe, a FIFO or a character device (``/dev/stdin``): readable once."""
    if path == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


class Source:
    """A log's bytes, read once, front to back; ``peek`` never consumes."""

    def __init__(self, path: str, raw: BinaryIO, owned: bool):
        self.path = path
        self._raw = raw
        self._owned = owned
        self._head = b""  # peeked bytes not yet handed out
        self._started = False

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        while len(self._head) < len(BOM):
            more = self._raw.read(len(BOM) - len(self._head))
            if not more:
                break
            self._head += more
        if self._head.startswith(BOM):
            self._head = self._head[len(BOM):]

    def peek(self, n: int = PEEK_BYTES) -> bytes:
        """The first ``n`` bytes (fewer at EOF), BOM dropped; they stay unread."""
        self._start()
        while len(self._head) < n:
            more = self._raw.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int) -> bytes:
        self._start()
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._raw.read(n - len(out))
            return out
        return self._raw.read(n)

    def read_all(self, limit: int) -> bytes:
        """Everything, refusing more than ``limit`` bytes (a whole-document format)."""
        data = self.read(limit + 1)
        while len(data) <= limit:
            more = self.read(limit + 1 - len(data))
            if not more:
                return data
            data += more
        raise err(self.path, None, f"larger than {limit >> 20} MiB for a single JSON document")

    def chunks(self, size: int | None = None, max_line: int | None = None,
               quoted: bool = False) -> Iterator[tuple[int, bytes, int]]:
        """``(first_line, block, newlines)``: blocks that end at a line end (the last may
        not), the 1-based line of their first byte and how many line ends they hold.

        ``quoted``: CSV, where a line end inside double quotes is not a record end (a
        record ends at a newline after an even number of quote characters)."""
        size = size or CHUNK_BYTES
        max_line = max_line or MAX_LINE_BYTES
        line = 1
        carry = bytearray()  # the unfinished last line, grown in place
        while True:
            block = self.read(size)
            if not block:
                if carry:
                    yield line, bytes(carry), carry.count(b"\n")
                return
            if carry:
                if len(carry) + len(block) > max_line and b"\n" not in block:
                    raise err(self.path, line, f"line longer than {_size(max_line)} (no line end "
                                               "found); not a line-per-record log?")
                carry += block
                buf: bytes | bytearray = carry
            else:
                buf = block
            cut = _cut(buf, quoted)
            if cut == 0:
                if len(buf) > max_line:
                    raise err(self.path, line, f"line longer than {_size(max_line)} (no line end "
                                               "found); not a line-per-record log?")
                if buf is block:
                    carry = bytearray(block)
                continue
            if buf is block:
                out = block if cut == len(block) else block[:cut]
            else:
                out = bytes(memoryview(buf)[:cut])
            carry = bytearray(memoryview(buf)[cut:])
            newlines = out.count(b"\n")
            if len(carry) > max_line:
                raise err(self.path, line + newlines,
                          f"line longer than {_size(max_line)}; not a line-per-record log?")
            yield line, out, newlines
            line += newlines

    def close(self) -> None:
        if self._owned:
            self._raw.close()


def open_source(path: str) -> Source:
    """Open ``path`` (``-`` is stdin) for one front-to-back read."""
    if path == "-":
        return Source("<stdin>", sys.stdin.buffer, owned=False)
    try:
        raw = open(path, "rb", buffering=0)
    except IsADirectoryError:
        raise err(path, None, "is a directory") from None
    except OSError as exc:
        raise err(path, None, f"cannot read ({exc.strerror or exc})") from None
    return Source(path, io.BufferedReader(raw, 1 << 20), owned=True)


def _cut(buf: bytes, quoted: bool) -> int:
    """Length of the longest prefix of ``buf`` that ends a record (0: none)."""
    end = len(buf)
    while True:
        cut = buf.rfind(b"\n", 0, end) + 1
        if cut == 0 or not quoted or buf.count(b'"', 0, cut) % 2 == 0:
            return cut
        end = cut - 1


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"
