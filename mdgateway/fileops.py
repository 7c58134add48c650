# -*- test-case-name: tests.test_spool -*-
"""
The file-system seam of the spool: every call that touches the disk, so tests
can inject faults at each one.
"""

from __future__ import annotations

import errno
import fcntl
import os

from zope.interface import Interface, implementer


class IFileOps(Interface):
    """
    The blocking file-system calls the spool makes, all from pool threads.

    A seam so tests can simulate a full disk; L{OSFileOps} is the real one.
    """

    def create(path: str) -> int:  # noqa: N805
        """
        Create a new file for writing (C{O_CREAT|O_EXCL}, mode 0600) and
        return its descriptor. C{FileExistsError} if it exists.
        """

    def open_existing(path: str) -> int:  # noqa: N805
        """
        Open an existing file read-only (used to test its lock).
        """

    def write(fd: int, data: bytes | memoryview) -> int:  # noqa: N805
        """
        Write some of C{data}; return how many bytes were written.
        """

    def fsync(fd: int) -> None:  # noqa: N805
        """
        Flush the file's data and metadata to stable storage.
        """

    def close(fd: int) -> None:  # noqa: N805
        """
        Close a descriptor (and so release its lock).
        """

    def lock(fd: int, blocking: bool) -> bool:  # noqa: N805
        """
        Take an exclusive advisory lock (C{flock}); return C{False} if
        C{blocking} is false and another open file holds it.
        """

    def move_noreplace(source: str, destination: str) -> None:  # noqa: N805
        """
        Give C{source} the name C{destination} (same file system) unless
        C{destination} exists (C{FileExistsError}).
        """

    def replace(source: str, destination: str) -> None:  # noqa: N805
        """
        Atomically rename C{source} over C{destination}.
        """

    def unlink(path: str) -> None:  # noqa: N805
        """
        Remove a name. C{FileNotFoundError} if absent.
        """

    def fsync_directory(path: str) -> None:  # noqa: N805
        """
        Make the directory's entries (creations, renames, removals) durable.
        """

    def listdir(path: str) -> list[str]:  # noqa: N805
        """
        Names in a directory.
        """

    def read_bytes(path: str) -> bytes:  # noqa: N805
        """
        A whole (small) file.
        """

    def exists(path: str) -> bool:  # noqa: N805
        """
        Whether a name exists.
        """

    def size(path: str) -> int:  # noqa: N805
        """
        A file's size in bytes.
        """

    def mkdir(path: str) -> bool:  # noqa: N805
        """
        Create a directory with mode 0700 (and missing parents); return
        C{False} if it existed.
        """

    def free_space(path: str) -> tuple[int, int | None]:  # noqa: N805
        """
        Bytes and inodes available to unprivileged users on the file
        system of C{path}; inodes are C{None} where it does not count them.
        """

    def open_lock(path: str) -> int:  # noqa: N805
        """
        Open the lock file C{path} for L{lock}, creating it (mode 0600) if
        missing; C{FileNotFoundError} if its directory is missing.
        """

    def names_file(fd: int, path: str) -> bool:  # noqa: N805
        """
        Whether C{path} still names the open file C{fd} (C{False} when it
        names nothing or another file).
        """

    def link(source: str, destination: str) -> None:  # noqa: N805
        """
        Give the file C{source} the further name C{destination} (a hard
        link, same file system); C{FileExistsError} if C{destination}
        exists.
        """

    def same_file(first: str, second: str) -> bool:  # noqa: N805
        """
        Whether both names exist and name one file.
        """

    def rmdir(path: str) -> None:  # noqa: N805
        """
        Remove an empty directory.
        """


@implementer(IFileOps)
class OSFileOps:
    """
    L{IFileOps} on the real file system.
    """

    def create(self, path: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return os.open(path, flags, 0o600)

    def open_existing(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def lock(self, fd: int, blocking: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def move_noreplace(self, source: str, destination: str) -> None:
        # A hard link fails on an existing destination, where rename would
        # silently replace an acknowledged entry on an id collision.
        try:
            os.link(source, destination)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # File systems without hard links: check, then rename.
            if os.path.lexists(destination):
                raise FileExistsError(errno.EEXIST, "exists", destination) from e
            os.replace(source, destination)
            return
        os.unlink(source)

    def replace(self, source: str, destination: str) -> None:
        os.replace(source, destination)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def mkdir(self, path: str) -> bool:
        try:
            os.makedirs(path, 0o700)
        except FileExistsError:
            return False
        return True

    def free_space(self, path: str) -> tuple[int, int | None]:
        st = os.statvfs(path)
        inodes = st.f_favail if st.f_files else None
        return st.f_bavail * st.f_frsize, inodes

    def open_lock(self, path: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, 0o600)

    def names_file(self, fd: int, path: str) -> bool:
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def link(self, source: str, destination: str) -> None:
        os.link(source, destination, follow_symlinks=False)

    def same_file(self, first: str, second: str) -> bool:
        try:
            a = os.stat(first, follow_symlinks=False)
            b = os.stat(second, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)
