# -*- test-case-name: tests.test_testing -*-
"""
File operations (L{IFileOps}) with faults: the real calls, recorded, failing
where a test says (a full disk, a failed fsync), or "crashing" at a chosen
call so recovery can be tested from every point a crash can leave.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from mdgateway.fileops import IFileOps, OSFileOps


@implementer(IFileOps)
class FaultyFileOps(OSFileOps):
    """
    The real file operations, with faults injected by the test: C{write}
    fails once C{write_budget} bytes are spent (or for files matching
    C{fail_writes_to}); any other call fails when named in C{faults} with a
    path containing the given text. Records every call in C{calls}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.write_budget: int | None = None
        self.write_errno = errno.ENOSPC
        self.fail_writes_to: str | None = None
        self.faults: dict[str, tuple[str, int]] = {}
        self.free: tuple[int, int | None] | None = None
        self._fd_paths: dict[int, str] = {}

    def _check(self, name: str, path: str) -> None:
        self.calls.append((name, path))
        if name in self.faults:
            text, err = self.faults[name]
            if text in path:
                raise OSError(err, os.strerror(err), path)

    def create(self, path: str) -> int:
        self._check("create", path)
        fd = super().create(path)
        self._fd_paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        path = self._fd_paths.get(fd, "")
        self._check("write", path)
        if self.fail_writes_to is not None and self.fail_writes_to in path:
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        if self.write_budget is not None:
            if self.write_budget <= 0:
                raise OSError(self.write_errno, os.strerror(self.write_errno))
            data = data[: self.write_budget]
            self.write_budget -= len(data)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("fsync", self._fd_paths.get(fd, ""))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._fd_paths.pop(fd, None)
        super().close(fd)

    def move_noreplace(self, source: str, destination: str) -> None:
        self._check("move_noreplace", destination)
        super().move_noreplace(source, destination)

    def replace(self, source: str, destination: str) -> None:
        self._check("replace", destination)
        super().replace(source, destination)

    def unlink(self, path: str) -> None:
        self._check("unlink", path)
        super().unlink(path)

    def fsync_directory(self, path: str) -> None:
        self._check("fsync_directory", path)
        super().fsync_directory(path)

    def free_space(self, path: str) -> tuple[int, int | None]:
        self._check("free_space", path)
        return self.free if self.free is not None else super().free_space(path)

    def open_lock(self, path: str) -> int:
        self._check("open_lock", path)
        return super().open_lock(path)

    def link(self, source: str, destination: str) -> None:
        self._check("link", destination)
        super().link(source, destination)

    def rmdir(self, path: str) -> None:
        self._check("rmdir", path)
        super().rmdir(path)


class CrashedError(OSError):
    """
    The file operation that a simulated crash cut off.
    """


@implementer(IFileOps)
class DyingFileOps(OSFileOps):
    """
    The real file operations, until the process "dies" at call number
    C{die_at} (counted from 1): that call and every later one raise
    L{CrashedError} without touching the disk, except C{close}, which the kernel
    does for a dead process. The disk is then left exactly as a crash at
    that point would leave it (short of a power loss).
    """

    def __init__(self) -> None:
        self.count = 0
        self.die_at: int | None = None

    def _step(self) -> None:
        self.count += 1
        if self.die_at is not None and self.count >= self.die_at:
            raise CrashedError(errno.EIO, "crashed")


def _dying(name: str) -> Callable[..., Any]:
    real = getattr(OSFileOps, name)

    @functools.wraps(real)
    def call(self: DyingFileOps, *args: Any) -> Any:
        self._step()
        return real(self, *args)

    return call


for _name in IFileOps.names():
    if _name != "close":
        setattr(DyingFileOps, _name, _dying(_name))


@implementer(IFileOps)
class WatchedFileOps(OSFileOps):
    """
    The real file operations, recording every call in C{calls}, running
    C{on_write} before each write, and failing the calls named in
    C{faults} (name to errno; C{write} after C{write_budget} bytes).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.faults: dict[str, int] = {}
        self.write_budget: int | None = None
        self.on_write: Callable[[], None] | None = None
        self.move_collisions = 0
        self._paths: dict[int, str] = {}

    def _record(self, name: str, path: str) -> None:
        self.calls.append((name, path))
        if name in self.faults:
            err = self.faults[name]
            raise OSError(err, os.strerror(err), path)

    def create(self, path: str) -> int:
        self._record("create", path)
        fd = super().create(path)
        self._paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._record("write", self._paths.get(fd, ""))
        if self.on_write is not None:
            self.on_write()
        if self.write_budget is not None:
            if self.write_budget <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[: self.write_budget]
            self.write_budget -= len(data)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._record("fsync", self._paths.get(fd, ""))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._record("close", self._paths.pop(fd, ""))
        super().close(fd)

    def move_noreplace(self, source: str, destination: str) -> None:
        self._record("move_noreplace", destination)
        if self.move_collisions:
            self.move_collisions -= 1
            raise FileExistsError(errno.EEXIST, "exists", destination)
        super().move_noreplace(source, destination)

    def mkdir(self, path: str) -> bool:
        self._record("mkdir", path)
        return super().mkdir(path)

    def unlink(self, path: str) -> None:
        self._record("unlink", path)
        super().unlink(path)

    def fsync_directory(self, path: str) -> None:
        self._record("fsync_directory", path)
        super().fsync_directory(path)
