# -*- test-case-name: tests.test_spool_offline -*-
"""
C{mdgateway spool ...}: a spool directory no gateway runs on, read and
changed on the spot, without the admin API (a stopped instance, a dead
node's disk mounted elsewhere): C{list}, C{show ID}, C{move --into DIR}.

The directory is C{--dir}, or the C{[spool] directory} of the
configuration (C{--config}); its worker roots (C{workers/<k>}) are
included. See L{mdgateway.queue.offline} for what is safe when.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from mdgateway.config import load_config
from mdgateway.ops.adminjson import iso
from mdgateway.ops.cliclient import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from mdgateway.ops.cliformat import human_size, local_time, print_json, table
from mdgateway.ops.clisettings import config_path
from mdgateway.queue.entry import SpoolError, SpoolInUseError
from mdgateway.queue.offline import (
    in_use,
    list_entries,
    move_entries,
    process_roots,
    show_entry,
)
from mdgateway.tomlreader import ConfigError


def add_commands(commands: Any) -> None:
    """
    Add C{spool} and its actions to the C{mdgateway} command's parsers;
    each runs locally (C{local}).
    """
    spool = commands.add_parser(
        "spool", help="a stopped instance's spool directory, offline"
    )
    actions = spool.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list its messages")
    listing.set_defaults(local=spool_list)
    show = actions.add_parser("show", help="one message's envelope, headers, parts")
    show.add_argument("id")
    show.set_defaults(local=spool_show)
    move = actions.add_parser(
        "move",
        help="move messages into another spool directory, whose gateway takes "
        "them over when it starts",
    )
    move.add_argument("ids", nargs="*", metavar="ID", help="the messages to move")
    move.add_argument("--all", action="store_true", help="move every message")
    move.add_argument(
        "--into", required=True, metavar="DIR", help="the target spool directory"
    )
    move.set_defaults(local=spool_move)
    for parser in (listing, show, move):
        parser.add_argument(
            "--dir",
            help="the spool directory (default: [spool] directory of the "
            "configuration --config names)",
        )


class _StopError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        self.message = message
        self.code = code


def _directory(args: argparse.Namespace) -> str:
    if args.dir:
        directory = str(args.dir)
    else:
        path = config_path(args.config, args.environ)[0]
        try:
            directory = load_config(path, check_files=False).spool.directory
        except ConfigError as e:
            raise _StopError(f"{path}: {'; '.join(e.problems)}") from None
    if not os.path.isdir(directory):
        raise _StopError(f"{directory}: no such spool directory")
    return directory


def _run(args: argparse.Namespace, out: TextIO, job: Any) -> int:
    try:
        code: int = job(args, out)
        return code
    except _StopError as e:
        _err(args).write(f"mdgateway: {e.message}\n")
        return e.code
    except (SpoolError, OSError, ValueError) as e:
        _err(args).write(f"mdgateway: {e}\n")
        return EXIT_FAILED


def _err(args: argparse.Namespace) -> TextIO:
    err: TextIO = getattr(args, "stderr", None) or sys.stderr
    return err


def _warn_in_use(directory: str, out: TextIO) -> None:
    busy = [
        ("primary" if p == 0 else f"worker {p}")
        for p, root in process_roots(directory)
        if in_use(root)
    ]
    if busy:
        out.write(
            f"note: a running gateway uses this spool ({', '.join(busy)}); "
            "'mdgateway queue' shows and changes its queue\n"
        )


def spool_list(args: argparse.Namespace, out: TextIO) -> int:
    def job(args: argparse.Namespace, out: TextIO) -> int:
        directory = _directory(args)
        found = list_entries(directory)
        if args.json:
            print_json(
                {
                    "directory": directory,
                    "items": [
                        {
                            "queue_id": e.entry.queue_id,
                            "process": e.process,
                            "received_at": e.entry.envelope.received_at,
                            "sender": e.entry.envelope.sender,
                            "recipients": [
                                r.address for r in e.entry.envelope.recipients
                            ],
                            "size": e.entry.size,
                            "held_by": (e.state or {}).get("held_by"),
                            "attempts": (e.state or {}).get("attempts", 0),
                        }
                        for e in found
                    ],
                },
                out,
            )
            return EXIT_OK
        _warn_in_use(directory, out)
        if not found:
            out.write(f"{directory}: no messages\n")
            return EXIT_OK
        rows = [
            (
                e.entry.queue_id,
                e.process,
                local_time(_iso(e.entry.envelope.received_at)),
                e.entry.envelope.sender or "<>",
                len(e.entry.envelope.recipients),
                human_size(e.entry.size),
                (e.state or {}).get("attempts", 0),
                f"held ({(e.state or {})['held_by']})"
                if (e.state or {}).get("held_by")
                else "",
            )
            for e in found
        ]
        out.write(
            table(
                (
                    "QUEUE ID",
                    "PROC",
                    "RECEIVED",
                    "SENDER",
                    "RCPTS",
                    "SIZE",
                    "TRIES",
                    "",
                ),
                rows,
                (24, 4, 19, 32, 5, 7, 5, 20),
            )
            + "\n"
        )
        out.write(f"{len(rows)} message(s) in {directory}\n")
        return EXIT_OK

    return _run(args, out, job)


def spool_show(args: argparse.Namespace, out: TextIO) -> int:
    def job(args: argparse.Namespace, out: TextIO) -> int:
        directory = _directory(args)
        found = show_entry(directory, args.id)
        if found is None:
            raise _StopError(f"{args.id}: not in {directory}")
        item, view = found
        envelope = item.entry.envelope
        if args.json:
            print_json(
                {
                    "queue_id": item.entry.queue_id,
                    "process": item.process,
                    "envelope": json.loads(envelope.to_json()),
                    "state": item.state,
                    "headers": view.headers,
                    "parts": [
                        {
                            "part_id": p.part_id,
                            "content_type": p.content_type,
                            "filename": p.filename,
                            "size": p.size,
                        }
                        for p in view.parts
                    ],
                },
                out,
            )
            return EXIT_OK
        state = item.state or {}
        records = state.get("recipients", {})
        lines = [
            f"queue id:   {item.entry.queue_id} (process {item.process})",
            f"received:   {local_time(_iso(envelope.received_at))} from "
            f"{envelope.client_helo} [{envelope.client_address}]",
            f"sender:     {envelope.sender or '<>'}",
            f"size:       {human_size(item.entry.size)}",
            f"attempts:   {state.get('attempts', 0)}"
            + (f", held by {state['held_by']}" if state.get("held_by") else ""),
        ]
        for r in envelope.recipients:
            status = records.get(r.address, {}).get("status", "pending")
            lines.append(f"recipient:  {r.address}: {status} (rule {r.rule})")
        lines += [
            "",
            "*** HEADERS ***",
            view.headers.rstrip("\r\n").replace("\r\n", "\n"),
        ]
        if not view.headers_complete:
            lines.append("(the header block is longer; cut here)")
        lines += ["", "*** MIME STRUCTURE ***"]
        if view.unreliable:
            lines.append(f"cannot be trusted: {view.unreliable}")
        for p in view.parts:
            name = f' "{p.filename}"' if p.filename else ""
            lines.append(
                f"{'  ' * p.depth}{p.part_id} {p.content_type}{name} "
                f"({human_size(p.size)}, {p.transfer_encoding})"
            )
        out.write("\n".join(lines) + "\n")
        return EXIT_OK

    return _run(args, out, job)


def spool_move(args: argparse.Namespace, out: TextIO) -> int:
    def job(args: argparse.Namespace, out: TextIO) -> int:
        if bool(args.ids) == bool(args.all):
            why = "name the messages to move, or --all (not both)"
            raise _StopError(why, EXIT_USAGE)
        directory = _directory(args)
        try:
            report = move_entries(directory, args.into, None if args.all else args.ids)
        except SpoolInUseError as e:
            raise _StopError(
                f"{e}: nothing was moved. Stop that gateway first; to hand "
                "messages to a running gateway, move them into <its spool>/"
                "workers/<N> (N at least its [processes] workers), which it "
                "adopts when it next starts"
            ) from None
        if args.json:
            print_json(
                {
                    "moved": list(report.moved),
                    "collided": list(report.collided),
                    "missing": list(report.missing),
                },
                out,
            )
        else:
            for queue_id in report.moved:
                out.write(f"{queue_id}: moved to {args.into}\n")
            for queue_id in report.collided:
                out.write(f"{queue_id}: not moved, {args.into} has that id already\n")
            for queue_id in report.missing:
                out.write(f"{queue_id}: not in {directory}\n")
            out.write(f"{len(report.moved)} message(s) moved\n")
        return EXIT_OK if not (report.collided or report.missing) else EXIT_FAILED

    return _run(args, out, job)


def _iso(at: float) -> str | None:
    return iso(at)
