# -*- test-case-name: tests.test_cli -*-
"""
C{mdgateway queue ...}: the queue of every instance of the cluster and the
queue tools, through the admin API (C{postqueue}, C{postsuper} and
C{postcat} in one command): C{list}, C{show}, C{hold}, C{release-hold},
C{delete} (C{--bounce}), C{bounce}, C{retry}, C{flush}.

Each takes C{--instance NAME} to name the instance whose spool holds the
message; without it the gateway finds it.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from mdgateway.ops.cliclient import EXIT_OK, AdminClient, quote
from mdgateway.ops.cliformat import human_size, local_time, print_json, table


def add_commands(commands: Any) -> None:
    """
    Add C{queue} and its actions to the C{mdgateway} command's parsers.
    """
    queue = commands.add_parser("queue", help="the queues of every instance")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list queued messages")
    _instance(listing)
    listing.set_defaults(run=queue_list)
    show = actions.add_parser(
        "show", help="a queued message's envelope, headers and MIME parts"
    )
    show.add_argument("id")
    _instance(show)
    show.set_defaults(run=queue_show)
    for name, text in (
        ("hold", "keep a message from being tried until released"),
        ("release-hold", "release a hold: the message is tried at once"),
        ("bounce", "fail the pending recipients and tell the sender now"),
        ("retry", "try a queued message now"),
        ("delete", "delete a queued message (silently, or --bounce)"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("id")
        _instance(sub)
        if name == "delete":
            sub.add_argument(
                "--bounce",
                action="store_true",
                help="send the sender a bounce saying it was deleted",
            )
        sub.set_defaults(run=queue_action(name))
    flush = actions.add_parser(
        "flush", help="try every queued message now (not those on hold)"
    )
    _instance(flush)
    flush.set_defaults(run=queue_flush)


def _instance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instance",
        metavar="NAME",
        help="the instance whose spool holds it (default: wherever it is)",
    )


def queue_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    data = client.call("GET", "/api/queue", query={"instance": args.instance})
    if args.json:
        print_json(data, out)
        return EXIT_OK
    items = data["items"]
    for instance in data.get("instances", ()):
        if instance.get("problem"):
            out.write(f"{instance['name']}: not listed ({instance['problem']})\n")
        elif instance.get("total", 0) > instance.get("listed", 0):
            out.write(
                f"{instance['name']}: the first {instance['listed']} of "
                f"{instance['total']} listed\n"
            )
    if not items:
        out.write("the queue is empty\n")
        return EXIT_OK
    headings: tuple[str, ...] = (
        "QUEUE ID",
        "RECEIVED",
        "SENDER",
        "RCPTS",
        "SIZE",
        "TRIES",
        "NEXT TRY",
        "LAST ERROR",
    )
    widths: tuple[int, ...] = (24, 19, 32, 5, 7, 5, 19, 50)
    rows: list[tuple[Any, ...]] = [
        (
            e["queue_id"],
            local_time(e["received_at"]),
            e["sender"] or "<>",
            len(e["recipients"]),
            human_size(e["size"]),
            e["attempts"],
            f"held ({e['held_by']})"
            if e.get("held_by")
            else local_time(e["next_attempt"]),
            e["last_error"] or "-",
        )
        for e in items
    ]
    if any(e.get("worker") for e in items):
        # Several processes ([processes] workers): say whose spool.
        headings, widths = ("PROC", *headings), (4, *widths)
        rows = [(e.get("worker", 0), *row) for e, row in zip(items, rows, strict=True)]
    if len(data.get("instances", ())) > 1:
        # A cluster: say whose instance.
        headings, widths = ("INSTANCE", *headings), (12, *widths)
        rows = [
            (e.get("instance", ""), *row) for e, row in zip(items, rows, strict=True)
        ]
    out.write(table(headings, rows, widths) + "\n")
    out.write(f"{len(rows)} queued\n")
    return EXIT_OK


def _next(entry: dict[str, Any]) -> str:
    if entry.get("held_by"):
        return f"held ({entry['held_by']})"
    return str(local_time(entry["next_attempt"]))


def queue_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    data = client.call(
        "GET", f"/api/queue/{quote(args.id)}", query={"instance": args.instance}
    )
    if args.json:
        print_json(data, out)
        return EXIT_OK
    where = data["instance"] + (f", worker {data['worker']}" if data["worker"] else "")
    lines = [
        f"queue id:   {data['queue_id']} (on {where})",
        f"received:   {local_time(data['received_at'])} from "
        f"{data['client_helo']} [{data['client_address']}]",
        f"sender:     {data['sender'] or '<>'}",
        f"size:       {human_size(data['size'])}",
        f"attempts:   {data['attempts']}, next "
        + (
            f"held by {data['held_by']}"
            if data["held_by"]
            else local_time(data["next_attempt"])
        ),
    ]
    for r in data["recipients"]:
        reply = f" ({r['last_reply']})" if r["last_reply"] else ""
        lines.append(f"recipient:  {r['address']}: {r['status']}{reply}")
    lines.append("")
    lines.append("*** HEADERS ***")
    lines.append(data["headers"].rstrip("\r\n").replace("\r\n", "\n"))
    if not data["headers_complete"]:
        lines.append("(the header block is longer; cut here)")
    lines.append("")
    lines.append("*** MIME STRUCTURE ***")
    if data["unreliable"]:
        lines.append(f"cannot be trusted: {data['unreliable']}")
    for part in data["parts"]:
        name = f' "{part["filename"]}"' if part["filename"] else ""
        lines.append(
            f"{'  ' * part['depth']}{part['part_id']} {part['content_type']}{name} "
            f"({human_size(part['size'])}, {part['transfer_encoding']})"
        )
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


def queue_action(action: str) -> Any:
    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        body: dict[str, Any] = {}
        if args.instance:
            body["instance"] = args.instance
        if action == "delete":
            body["bounce"] = bool(args.bounce)
            data = client.call("DELETE", f"/api/queue/{quote(args.id)}", body=body)
        elif action == "release-hold":
            data = client.call("DELETE", f"/api/queue/{quote(args.id)}/hold", body=body)
        else:
            data = client.call(
                "POST", f"/api/queue/{quote(args.id)}/{action}", body=body
            )
        if args.json:
            print_json(data, out)
        else:
            out.write(f"{data['detail']}\n")
        return EXIT_OK

    return run


def queue_flush(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    body = {"instance": args.instance} if args.instance else {}
    data = client.call("POST", "/api/queue/flush", body=body)
    if args.json:
        print_json(data, out)
        return EXIT_OK
    for name, count in data["tried"].items():
        out.write(f"{name}: {count} message(s) tried now\n")
    for name, why in data["problems"].items():
        out.write(f"{name}: not flushed ({why})\n")
    return EXIT_OK
