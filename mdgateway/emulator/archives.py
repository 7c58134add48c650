# -*- test-case-name: tests.test_core_emulator -*-
"""
Archive extraction for the Core emulator, with the standard library only:
zip (stored and compressed, with ZipCrypto passwords), tar, gzip, bzip2 and
xz, one level at a time (the caller recurses into a child that is itself an
archive).

Encryption is read from the archive's own structure (the general-purpose
flag of each zip entry), never guessed from byte patterns, and an entry
counts as readable only when one of the given passwords really decrypts it
(the CRC check passes). Limits on the number and the total size of the
extracted files are enforced while copying, so a lying header or a
decompression bomb stops at the limit.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, BinaryIO, cast

import attrs

#: C{scan_all_result_i} codes of archive problems.
ENCRYPTED = 12
TOO_BIG = 13
TOO_MANY = 14
EXTRACTION_FAILED = 24

_BLOCK = 1 << 16
_SUFFIXES = {
    "gzip": (".tgz", ".gz"),
    "bz2": (".tbz2", ".tbz", ".bz2"),
    "xz": (".txz", ".xz"),
}


class ArchiveProblemError(Exception):
    """
    The archive cannot be (fully) extracted; C{code} is the
    C{scan_all_result_i} it stands for.
    """

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


@attrs.frozen
class Limits:
    """
    What one archive may extract.
    """

    files: int
    size: int


@attrs.frozen
class Entry:
    """
    One extracted file: its path inside the archive and a temporary copy
    (the caller removes it).
    """

    name: str
    path: str


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.files = 0
        self.size = 0

    def count(self) -> None:
        self.files += 1
        if self.files > self.limits.files:
            raise ArchiveProblemError(
                TOO_MANY, f"more than {self.limits.files} files in the archive"
            )

    def copy(self, source: IO[bytes], workdir: str) -> str:
        fd, path = tempfile.mkstemp(prefix="child-", dir=workdir)
        try:
            with os.fdopen(fd, "wb") as out:
                while block := source.read(_BLOCK):
                    self.size += len(block)
                    if self.size > self.limits.size:
                        raise ArchiveProblemError(
                            TOO_BIG,
                            f"more than {self.limits.size} bytes extracted",
                        )
                    out.write(block)
        except BaseException:
            os.unlink(path)
            raise
        return path


def _single_name(outer: str, kind: str) -> str:
    base = outer.rsplit("/", 1)[-1]
    lowered = base.lower()
    for suffix in _SUFFIXES[kind]:
        if lowered.endswith(suffix):
            stem = base[: -len(suffix)]
            return stem + ".tar" if suffix.startswith(".t") else stem
    return base + ".out" if base else "data"


def _working_password(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, passwords: Sequence[bytes]
) -> bytes | None:
    for password in passwords:
        try:
            with archive.open(info, pwd=password) as member:
                while member.read(_BLOCK):
                    pass
        except (
            RuntimeError,
            zipfile.BadZipFile,
            NotImplementedError,
            ValueError,
            zlib.error,
            EOFError,
        ):
            continue
        return password
    return None


def _zip(
    source: BinaryIO, passwords: Sequence[bytes], budget: _Budget, workdir: str
) -> Iterator[Entry]:
    with zipfile.ZipFile(source) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > budget.limits.files:
            raise ArchiveProblemError(
                TOO_MANY, f"{len(infos)} files (limit {budget.limits.files})"
            )
        if sum(i.file_size for i in infos) > budget.limits.size:
            raise ArchiveProblemError(TOO_BIG, "declared sizes exceed the limit")
        keys: dict[str, bytes | None] = {}
        for info in infos:
            if info.flag_bits & 0x1:
                key = _working_password(archive, info, passwords)
                if key is None:
                    raise ArchiveProblemError(
                        ENCRYPTED, f"{info.filename}: encrypted, no working password"
                    )
                keys[info.filename] = key
        for info in infos:
            budget.count()
            with archive.open(info, pwd=keys.get(info.filename)) as member:
                path = budget.copy(member, workdir)
            yield Entry(info.filename, path)


def _tar(source: BinaryIO, budget: _Budget, workdir: str) -> Iterator[Entry]:
    with tarfile.open(fileobj=source, mode="r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            budget.count()
            stream = archive.extractfile(member)
            if stream is None:
                continue
            with stream:
                path = budget.copy(stream, workdir)
            yield Entry(member.name, path)


def _single(
    source: BinaryIO, kind: str, outer: str, budget: _Budget, workdir: str
) -> Iterator[Entry]:
    opened: IO[bytes]
    if kind == "gzip":
        opened = cast(IO[bytes], gzip.GzipFile(fileobj=source, mode="rb"))
    elif kind == "bz2":
        opened = cast(IO[bytes], bz2.BZ2File(source, mode="rb"))
    else:
        opened = cast(IO[bytes], lzma.LZMAFile(source, mode="rb"))
    budget.count()
    with opened:
        path = budget.copy(opened, workdir)
    yield Entry(_single_name(outer, kind), path)


def extract(
    source: BinaryIO,
    kind: str,
    *,
    outer_name: str,
    passwords: Sequence[bytes],
    limits: Limits,
    workdir: str,
) -> Iterator[Entry]:
    """
    Extract the archive C{source} (seekable, of type C{kind}) one entry at a
    time into temporary files under C{workdir}.

    @param outer_name: the archive's own name (a gzip's child is named after
        it).
    @raise ArchiveProblemError: encrypted without a working password (12), too
        many files (14), too many bytes (13), or damaged (24). Entries
        already yielded stay valid.
    """
    source.seek(0)
    budget = _Budget(limits)
    try:
        if kind == "zip":
            yield from _zip(source, passwords, budget, workdir)
        elif kind == "tar":
            yield from _tar(source, budget, workdir)
        else:
            yield from _single(source, kind, outer_name, budget, workdir)
    except ArchiveProblemError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        tarfile.TarError,
        EOFError,
        lzma.LZMAError,
        zlib.error,
        NotImplementedError,
        OSError,
        ValueError,
        RuntimeError,
    ) as e:
        raise ArchiveProblemError(EXTRACTION_FAILED, f"{type(e).__name__}: {e}") from e


def zip_names(source: BinaryIO) -> list[str] | None:
    """
    The entry names of a zip, or C{None} when it does not open as one.
    """
    source.seek(0)
    try:
        with zipfile.ZipFile(source) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return None


def remove(path: str) -> None:
    """
    Remove a temporary file, ignoring one already gone.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "ArchiveProblemError",
    "Entry",
    "Limits",
    "extract",
    "remove",
    "zip_names",
]
