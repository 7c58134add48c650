# -*- test-case-name: tests.test_admin -*-
"""
The admin API's bearer tokens: named, read from one file, or made on first
start.

The token file holds one token per line as C{name:token}; the name is who
the audit says did what (C{alice}, C{backup-job}). Blank lines and lines
starting with C{#} are skipped. A line without a name (what earlier
versions wrote, and what a first start writes) is the token named
C{admin}, so an existing file keeps working unchanged::

    # operators of mail.example.com
    alice:4f0c9d...
    bob:e1a77b...
    monitoring:9b2e54...

Names are 1 to 64 letters, digits, C{.}, C{_}, C{@} or C{-}; a token is
printable text without spaces and may not contain C{:} when unnamed.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping

#: The name of a token given without one.
DEFAULT_NAME = "admin"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class TokenFileError(ValueError):
    """
    The token file cannot be used; the message names the file and line.
    """


def parse_tokens(text: str, source: str = "token file") -> dict[str, str]:
    """
    The tokens in C{text} (the token file's content), by name.

    @raise TokenFileError: on a bad line, a repeated name or token, or
        no token at all.
    """
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, token = line.partition(":")
        if not colon:
            name, token = DEFAULT_NAME, line
        where = f"{source}, line {number}"
        if not _NAME.match(name):
            raise TokenFileError(f"{where}: not a token name: {name!r}")
        if not token or not token.isprintable() or any(c.isspace() for c in token):
            raise TokenFileError(f"{where}: the token must be printable, no spaces")
        if name in tokens:
            raise TokenFileError(f"{where}: the name {name!r} is used twice")
        if token in tokens.values():
            raise TokenFileError(f"{where}: the same token is given twice")
        tokens[name] = token
    if not tokens:
        raise TokenFileError(f"{source}: no token in it")
    return tokens


def load_tokens(path: str) -> dict[str, str]:
    """
    The named tokens in the file at C{path}. Blocking: run it in a thread
    (or at start).

    @raise TokenFileError: see L{parse_tokens}.
    @raise OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        return parse_tokens(f.read(), path)


def load_or_create_tokens(path: str) -> dict[str, str]:
    """
    The named tokens of C{path}; on first start (no file, or one without
    a token) a random token named C{admin} is written there (mode 0600,
    folder 0700). Blocking.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    lines = [line.strip() for line in text.splitlines()]
    if any(line and not line.startswith("#") for line in lines):
        return parse_tokens(text, path)
    os.makedirs(os.path.dirname(path) or ".", 0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return {DEFAULT_NAME: token}


def load_or_create_token(path: str) -> str:
    """
    The token named C{admin} of C{path} (or its only token), created on
    first start as L{load_or_create_tokens} does. Blocking.
    """
    return pick_token(load_or_create_tokens(path), None, path)


def pick_token(
    tokens: Mapping[str, str], name: str | None, source: str = "token file"
) -> str:
    """
    The token a client should send: the one named C{name}, else the only
    one, else the one named C{admin}.

    @raise TokenFileError: when that is ambiguous or missing.
    """
    if name is not None:
        if name not in tokens:
            raise TokenFileError(f"{source}: no token named {name!r}")
        return tokens[name]
    if len(tokens) == 1:
        return next(iter(tokens.values()))
    if DEFAULT_NAME in tokens:
        return tokens[DEFAULT_NAME]
    names = ", ".join(sorted(tokens))
    raise TokenFileError(f"{source}: several tokens ({names}); say which to use")


def find_token(tokens: Iterable[tuple[str, bytes]], presented: bytes) -> str | None:
    """
    The name of the token C{presented} among C{(name, token)} pairs, or
    L{None}. Every token is compared, in constant time each, so the time
    taken says nothing about which one (or which prefix) came close.
    """
    found = None
    for name, token in tokens:
        if hmac.compare_digest(presented, token) and found is None:
            found = name
    return found
