# -*- test-case-name: tests.test_admin -*-
"""
The admin API's bearer token: read from its file, or made on first start.
"""

from __future__ import annotations

import os
import secrets


def load_or_create_token(path: str) -> str:
    """
    The admin bearer token from C{path}; on first start a random one is
    written there (mode 0600). Blocking: run it in a thread.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", 0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token
