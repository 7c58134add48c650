# -*- test-case-name: tests.test_cli -*-
"""
The C{mdgateway} command: check a configuration file, and talk to a running
gateway through its admin HTTP API. On the gateway's host it needs no flags:
the admin API's address and token come from the configuration file (see
L{mdgateway.ops.clisettings}).

The command is split by job: this module reads the command line;
L{clisettings} finds the API and its token; L{cliclient} speaks HTTP;
L{clicommands} runs each command; L{cliformat} lays out the answers.

Exit status: 0 done; 1 the gateway refused or failed (or the configuration
has problems); 2 bad usage; 3 the admin API cannot be reached; 4 the token
was refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from mdgateway.ops import clicommands
from mdgateway.ops.cliclient import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AdminClient,
    CliError,
)
from mdgateway.ops.cliformat import human_size, local_time, table
from mdgateway.ops.cliqueue import add_commands as add_queue_commands
from mdgateway.ops.clisettings import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_URL,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TOKEN_NAME_ENV,
    URL_ENV,
    admin_target,
)
from mdgateway.ops.clispool import add_commands as add_spool_commands
from mdgateway.ops.console.userscli import add_commands as add_user_commands

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNAUTHORIZED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "AdminClient",
    "CliError",
    "human_size",
    "local_time",
    "main",
    "table",
]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises instead of exiting, so L{main} returns
    its status to callers that embed it (and to tests).
    """

    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        if message:
            raise _UsageError(message.rstrip("\n"))
        raise _ExitRequestError(status)


class _ExitRequestError(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _parser() -> _Parser:
    parser = _Parser(
        prog="mdgateway",
        description="Check mdgateway configuration and operate a running gateway.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"the gateway's configuration, for the admin API's address and "
        f"token file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--url",
        help=f"admin API base URL (default: ${URL_ENV}, else [admin] endpoint "
        f"of the configuration, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"path of the file holding the admin API token (default: "
        f"${TOKEN_FILE_ENV}, else the token itself in ${TOKEN_ENV}, else "
        "[admin] token_file of the configuration)",
    )
    parser.add_argument(
        "--token-name",
        help="which token of a file of named tokens to use "
        f"(default: ${TOKEN_NAME_ENV}, the only one, or 'admin')",
    )
    parser.add_argument("--cafile", help="CA certificates for an https URL")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (30)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument(
        "file", nargs="?", help="the file (default: the one --config names)"
    )
    check.add_argument(
        "--no-check-files",
        action="store_true",
        help="do not check that the files it names exist (a file for another host)",
    )
    check.set_defaults(local=clicommands.check_config)

    commands.add_parser("status", help="is the gateway ready?").set_defaults(
        run=clicommands.status
    )
    commands.add_parser("reload", help="reload the configuration file").set_defaults(
        run=clicommands.reload
    )

    add_queue_commands(commands)
    add_spool_commands(commands)

    quarantine = commands.add_parser("quarantine", help="quarantined originals")
    actions = quarantine.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list quarantined originals")
    _time_options(listing)
    for name in ("sender", "recipient", "subject", "reason", "rule"):
        listing.add_argument(f"--{name}")
    _page_options(listing)
    listing.set_defaults(run=clicommands.quarantine_list)
    for name, run, text in (
        ("show", clicommands.quarantine_show, "show one item"),
        (
            "release",
            clicommands.quarantine_action("release", "released"),
            "deliver the original",
        ),
        (
            "rescan",
            clicommands.quarantine_action("rescan", "rescanning"),
            "scan it again",
        ),
        ("pin", clicommands.quarantine_pin(True), "exempt from cleanup"),
        ("unpin", clicommands.quarantine_pin(False), "no longer exempt from cleanup"),
        ("delete", clicommands.quarantine_delete, "delete for good"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("id")
        if name in ("release", "rescan"):
            _action_options(sub)
        sub.set_defaults(run=run)
    forward = actions.add_parser("forward", help="send the original to addresses")
    forward.add_argument("id")
    forward.add_argument("addresses", nargs="+", metavar="ADDRESS")
    _action_options(forward)
    forward.set_defaults(run=clicommands.quarantine_action("forward", "forwarded"))
    download = actions.add_parser("download", help="save the original as .eml")
    download.add_argument("id")
    download.add_argument("-o", "--output", help="file to write (default: ID.eml)")
    download.set_defaults(run=clicommands.quarantine_download)

    messages = commands.add_parser("messages", help="the email history")
    maction = messages.add_subparsers(dest="action", metavar="ACTION", required=True)
    search = maction.add_parser("search", help="search the history")
    _time_options(search)
    for name in ("sender", "recipient", "subject", "rule", "direction"):
        search.add_argument(f"--{name}")
    search.add_argument("--status", action="append", help="repeatable")
    search.add_argument("--verdict", action="append", help="repeatable")
    _page_options(search)
    search.set_defaults(run=clicommands.messages_search)
    show = maction.add_parser("show", help="one history entry in full")
    show.add_argument("id")
    show.set_defaults(run=clicommands.messages_show)

    refused = commands.add_parser("refused", help="the refused log")
    raction = refused.add_subparsers(dest="action", metavar="ACTION", required=True)
    rlist = raction.add_parser("list", help="list refusals")
    _time_options(rlist)
    for name in ("client", "sender", "recipient", "listener", "category"):
        rlist.add_argument(f"--{name}")
    _page_options(rlist)
    rlist.set_defaults(run=clicommands.refused_list)

    audit = commands.add_parser("audit", help="what operators did")
    aaction = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    alist = aaction.add_parser("list", help="list audit entries")
    _time_options(alist)
    alist.add_argument("--actor", help="the name of the operator's token")
    alist.add_argument("--action", dest="action_name", help="release, pin, ...")
    alist.add_argument("--target", help="a quarantine item or queue id")
    _page_options(alist)
    alist.set_defaults(run=clicommands.audit_list)
    add_user_commands(commands)
    return parser


def _action_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="do it even if done before, or if Core blocked the original",
    )
    parser.add_argument(
        "--key",
        help="an idempotency key: a retry with the same key does nothing again",
    )


def _time_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", help="from this time (ISO-8601 local, epoch, or 2h/7d ago)"
    )
    parser.add_argument("--until", help="before this time (same forms)")


def _page_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, help="rows per page (50, at most 1000)")
    parser.add_argument("--cursor", help="the next page, as the last page said")


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Run the C{mdgateway} command; returns the exit status.

    @param argv: the arguments (default: C{sys.argv[1:]}).
    @param environ: where C{MDGATEWAY_CONFIG}, C{MDGATEWAY_ADMIN_URL},
        C{MDGATEWAY_ADMIN_TOKEN_FILE} and C{MDGATEWAY_ADMIN_TOKEN} are looked
        up (default: C{os.environ}).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = environ if environ is not None else os.environ
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except _UsageError as e:
        err.write(f"{e}\n")
        return EXIT_USAGE
    except _ExitRequestError as e:
        # --help printed to sys.stdout by argparse; nothing else to say.
        return e.status
    try:
        if hasattr(args, "local"):
            # Local commands find their files themselves (the configuration
            # by --config, $MDGATEWAY_CONFIG or the default).
            args.environ = env
            args.stderr = err
            code: int = args.local(args, out)
            return code
        target = admin_target(
            args.url, args.token_file, args.config, env, args.token_name
        )
        client = AdminClient(
            target.url, target.token, timeout=args.timeout, cafile=args.cafile
        )
        code = args.run(client, args, out)
        return code
    except CliError as e:
        err.write(f"mdgateway: {e.message}\n")
        return e.code
    except KeyboardInterrupt:
        err.write("mdgateway: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
