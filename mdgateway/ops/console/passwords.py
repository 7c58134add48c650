# -*- test-case-name: tests.test_console_units -*-
"""
The console's operator accounts: a users file of scrypt password hashes.

One line per operator, C{name:scrypt$N$r$p$salt$hash} (salt and hash in
unpadded URL-safe base64); blank lines and C{#} comments are kept out.
Hashes come from the standard library's C{hashlib.scrypt} with a random
16-byte salt per user; the cost parameters travel with each hash, so they
can be raised later without invalidating older lines. Verifying compares
in constant time and, for an unknown name, still spends one hash's time,
so a timing difference does not tell which names exist.

Everything here blocks (scrypt is deliberately slow, files are read and
written): callers run it in a thread pool.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import tempfile
from collections.abc import Mapping

#: scrypt cost: 2**15 iterations of 8-block mixing, 32 MiB and about
#: 0.15 s per hash on one core.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_KEY_BYTES = 32
_SALT_BYTES = 16

#: What an operator name may be: it appears in logs and the audit.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

#: The shortest password accepted when one is set.
MIN_PASSWORD = 8


class UsersFileError(ValueError):
    """
    The users file cannot be used; the message names the file and line.
    """


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=129 * r * n * p + 1024 * 1024,
        dklen=_KEY_BYTES,
    )


def hash_password(
    password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """
    The stored form of C{password}, with a fresh random salt.
    """
    salt = os.urandom(_SALT_BYTES)
    key = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    fields = encoded.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        raise ValueError("not an scrypt hash")
    n, r, p = (int(f) for f in fields[1:4])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**22:
        raise ValueError("scrypt parameters out of range")
    return n, r, p, _unb64(fields[4]), _unb64(fields[5])


def check_hash(encoded: str) -> None:
    """
    @raise ValueError: C{encoded} is not a hash L{hash_password} makes.
    """
    try:
        _parse_hash(encoded)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e) or "not an scrypt hash") from None


@functools.cache
def _dummy() -> str:
    """
    A hash spent on unknown names, so they take as long as known ones.
    """
    return hash_password("not a password: a name that does not exist")


def verify_password(password: str, encoded: str | None) -> bool:
    """
    Whether C{password} matches the stored C{encoded} hash; C{None} (no
    such operator) spends the same time and answers C{False}.
    """
    try:
        n, r, p, salt, key = _parse_hash(encoded or _dummy())
    except (ValueError, TypeError):
        return False
    found = _scrypt(password, salt, n, r, p)
    return hmac.compare_digest(found, key) and encoded is not None


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """
    Operator name to stored hash, from a users file's text.

    @raise UsersFileError: a line is not C{name:hash}, a name is invalid
        or repeated.
    """
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, encoded = line.partition(":")
        where = f"{source}, line {number}"
        if not colon or not NAME.match(name):
            raise UsersFileError(f"{where}: not 'name:hash' with a valid name")
        try:
            check_hash(encoded)
        except ValueError as e:
            raise UsersFileError(f"{where}: {e}") from None
        if name in users:
            raise UsersFileError(f"{where}: {name!r} appears twice")
        users[name] = encoded
    return users


def format_users(users: Mapping[str, str]) -> str:
    """
    The users file's text for C{users}, sorted by name.
    """
    head = "# mdgateway console operators: name:scrypt hash (mdgateway users add)\n"
    return head + "".join(f"{name}:{users[name]}\n" for name in sorted(users))


def read_users(path: str) -> dict[str, str]:
    """
    The users in the file at C{path}; none when it does not exist.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsersFileError(f"{path}: cannot read: {e}") from None
    return parse_users(text, path)


def write_users(path: str, users: Mapping[str, str]) -> None:
    """
    Replace the file at C{path} with C{users}, atomically, mode 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, 0o700, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".users-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(format_users(users))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(scratch, 0o600)
        os.replace(scratch, path)
    except BaseException:
        try:
            os.unlink(scratch)
        except FileNotFoundError:
            pass
        raise


def set_password(path: str, name: str, password: str, **cost: int) -> bool:
    """
    Add operator C{name} to the users file, or change their password;
    C{True} when the operator is new.

    @raise ValueError: the name or the password is not acceptable.
    """
    if not NAME.match(name):
        raise ValueError(
            f"not an operator name: {name!r} (letters, digits, '.', '_', '@', "
            "'-'; at most 64)"
        )
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password must have at least {MIN_PASSWORD} characters")
    users = read_users(path)
    new = name not in users
    users[name] = hash_password(password, **cost)
    write_users(path, users)
    return new


def remove_user(path: str, name: str) -> bool:
    """
    Remove operator C{name}; C{False} when there was none.
    """
    users = read_users(path)
    if users.pop(name, None) is None:
        return False
    write_users(path, users)
    return True
