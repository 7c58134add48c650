# -*- test-case-name: tests.test_console_units -*-
"""
C{mdgateway users add|remove|list}: the console's operator accounts.

The users file is C{--file}, or the C{[admin] users_file} of the
configuration named by C{--config}. C{add} asks for the password twice on
a terminal, or reads one line from standard input (for scripts:
C{printf '%s\\n' "$pw" | mdgateway users add alice}). The running gateway
reads the file again at the next login: no reload needed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any, TextIO

from mdgateway.config import load_config
from mdgateway.ops.clisettings import CONFIG_ENV, DEFAULT_CONFIG, config_path
from mdgateway.ops.console.passwords import (
    UsersFileError,
    read_users,
    remove_user,
    set_password,
)
from mdgateway.tomlreader import ConfigError


def add_commands(commands: Any) -> None:
    """
    Add C{users} and its actions to the C{mdgateway} command's
    sub-parsers; each runs locally (C{local}), without the admin API.
    """
    users = commands.add_parser("users", help="console operator accounts")
    actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add", help="add an operator or change a password (asked, or from stdin)"
    )
    add.add_argument("name")
    add.set_defaults(local=_add)
    remove = actions.add_parser("remove", help="remove an operator")
    remove.add_argument("name")
    remove.set_defaults(local=_remove)
    listing = actions.add_parser("list", help="list the operators")
    listing.set_defaults(local=_list)
    for parser in (add, remove, listing):
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--file", help="the users file")
        where.add_argument(
            "--config",
            dest="users_config",
            help="take [admin] users_file from this configuration (default: "
            f"mdgateway's --config, ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
        )


class _FailedError(Exception):
    pass


def _users_file(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    path, _ = config_path(
        args.users_config or getattr(args, "config", None),
        getattr(args, "environ", os.environ),
    )
    try:
        return load_config(path, check_files=False).admin.users_file
    except ConfigError as e:
        raise _FailedError("; ".join(e.problems)) from None


def _password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise _FailedError("the passwords differ")
        return first
    line = stdin.readline()
    if not line:
        raise _FailedError("no password on standard input")
    return line.rstrip("\r\n")


def _run(job: Any, args: argparse.Namespace, out: TextIO) -> int:
    try:
        return int(job(args, out))
    except (_FailedError, UsersFileError, ValueError, OSError) as e:
        sys.stderr.write(f"mdgateway: {e}\n")
        return 1


def _add(args: argparse.Namespace, out: TextIO) -> int:
    def add(args: argparse.Namespace, out: TextIO) -> int:
        path = _users_file(args)
        new = set_password(path, args.name, _password(sys.stdin))
        out.write(f"{'added' if new else 'changed the password of'} {args.name}")
        out.write(f" in {path}\n")
        return 0

    return _run(add, args, out)


def _remove(args: argparse.Namespace, out: TextIO) -> int:
    def remove(args: argparse.Namespace, out: TextIO) -> int:
        path = _users_file(args)
        if not remove_user(path, args.name):
            raise _FailedError(f"no operator {args.name!r} in {path}")
        out.write(f"removed {args.name} from {path}\n")
        return 0

    return _run(remove, args, out)


def _list(args: argparse.Namespace, out: TextIO) -> int:
    def listing(args: argparse.Namespace, out: TextIO) -> int:
        for name in sorted(read_users(_users_file(args))):
            out.write(f"{name}\n")
        return 0

    return _run(listing, args, out)
