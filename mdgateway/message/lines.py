# -*- test-case-name: tests.test_message_structure -*-
"""
Chunked reading of a spooled message by CRLF lines, with file offsets.

Messages can be tens of megabytes, so nothing here holds more than one chunk
plus one bounded line.  Lines are split on CRLF only: the gateway has already
refused bare CR and LF, and for any other input a lone CR or LF is just a
byte inside a line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

CHUNK_SIZE = 64 * 1024


class LineReader:
    """
    Read a binary file as CRLF lines and skip quickly to interesting lines.

    @ivar offset: see L{LineReader.offset}.
    """

    def __init__(self, file: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        self._file = file
        self._chunk_size = chunk_size
        self._buffer = b""
        self._base = file.tell()
        self._pos = 0
        self._eof = False
        self._at_line_start = True

    @property
    def offset(self) -> int:
        """
        The file offset of the next byte to be returned.
        """
        return self._base + self._pos

    @property
    def at_eof(self) -> bool:
        """
        Whether every byte of the file has been returned or skipped.
        """
        return self._pos >= len(self._buffer) and not self._fill()

    def _fill(self) -> bool:
        """
        Read one more chunk, dropping the bytes already consumed.

        @return: L{False} at end of file.
        """
        if self._eof:
            return False
        data = self._file.read(self._chunk_size)
        if not data:
            self._eof = True
            return False
        if self._pos:
            self._base += self._pos
            self._buffer = self._buffer[self._pos :] + data
            self._pos = 0
        else:
            self._buffer += data
        return True

    def _ensure(self, count: int) -> bool:
        while len(self._buffer) - self._pos < count:
            if not self._fill():
                return False
        return True

    def readline(self, limit: int) -> bytes:
        """
        Return the next line with its CRLF, or C{b""} at end of file.

        A line longer than C{limit} comes back in pieces of at most C{limit}
        bytes; a piece without a trailing CRLF is such a fragment, or the
        last line of a file that does not end with CRLF.  A piece never ends
        between the CR and LF of a line ending.
        """
        limit = max(limit, 2)
        scanned = 0
        while True:
            start = self._pos
            found = self._buffer.find(b"\r\n", start + scanned, start + limit)
            if found >= 0:
                end = found + 2
                break
            available = len(self._buffer) - start
            if available >= limit:
                end = start + limit
                if self._buffer[end - 1 : end] == b"\r":
                    end -= 1
                break
            scanned = max(0, available - 1)
            if not self._fill():
                end = len(self._buffer)
                break
        line = self._buffer[self._pos : end]
        self._pos = end
        self._at_line_start = line.endswith(b"\r\n")
        return line

    def skip_to_line_starting(self, prefix: bytes) -> bool:
        """
        Advance to the start of the next line that begins with C{prefix}.

        The current position counts if it is a line start.

        @return: L{True} if such a line was found (the reader is positioned
            at it), L{False} at end of file (the reader is at the end).
        """
        needle = b"\r\n" + prefix
        keep = len(needle) - 1
        while True:
            if self._at_line_start:
                if not self._ensure(len(prefix)):
                    self._pos = len(self._buffer)
                    return False
                if self._buffer.startswith(prefix, self._pos):
                    return True
            found = self._buffer.find(needle, self._pos)
            if found >= 0:
                self._pos = found + 2
                self._at_line_start = True
                continue
            self._pos = max(self._pos, len(self._buffer) - keep)
            self._at_line_start = False
            if not self._fill():
                self._pos = len(self._buffer)
                return False

    def skip_to_end(self) -> int:
        """
        Consume the rest of the file without keeping it.

        @return: the file size (the final offset).
        """
        self._pos = len(self._buffer)
        while self._fill():
            self._pos = len(self._buffer)
        return self.offset

    def chunks(self) -> Iterator[bytes]:
        """
        Yield the rest of the file, buffered bytes first, in chunks.
        """
        if self._pos < len(self._buffer):
            yield self._buffer[self._pos :]
        self._base += len(self._buffer)
        self._buffer = b""
        self._pos = 0
        while not self._eof:
            data = self._file.read(self._chunk_size)
            if not data:
                self._eof = True
                break
            self._base += len(data)
            yield data


def copy_range(source: BinaryIO, output: BinaryIO, start: int, end: int) -> None:
    """
    Copy bytes C{[start, end)} of C{source} to C{output} in chunks.
    """
    source.seek(start)
    remaining = end - start
    while remaining > 0:
        data = source.read(min(CHUNK_SIZE, remaining))
        if not data:
            raise OSError(f"file ended at {end - remaining}, expected {end}")
        output.write(data)
        remaining -= len(data)


def read_range(source: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """
    Yield bytes C{[start, end)} of C{source} in chunks.
    """
    source.seek(start)
    remaining = end - start
    while remaining > 0:
        data = source.read(min(CHUNK_SIZE, remaining))
        if not data:
            raise OSError(f"file ended at {end - remaining}, expected {end}")
        remaining -= len(data)
        yield data
