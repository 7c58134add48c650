# -*- test-case-name: tests.test_cli -*-
"""
The C{mdgateway} command's commands: C{check-config} on a file, and each
API command as one or two requests and a table (or the API's JSON).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, TextIO

from mdgateway.config import GatewayConfig, load_config
from mdgateway.ops.cliclient import (
    EXIT_FAILED,
    EXIT_OK,
    AdminClient,
    CliError,
    quote,
)
from mdgateway.ops.cliformat import (
    fields,
    human_size,
    local_time,
    page_footer,
    print_json,
    table,
    times,
)
from mdgateway.ops.clisettings import config_path
from mdgateway.tomlreader import ConfigError


def check_config(args: argparse.Namespace, out: TextIO) -> int:
    if args.file is None:
        args.file = config_path(args.config, args.environ)[0]
    try:
        config = load_config(args.file, check_files=not args.no_check_files)
    except ConfigError as e:
        if args.json:
            print_json({"ok": False, "problems": list(e.problems)}, out)
        else:
            count = len(e.problems)
            out.write(f"{args.file}: {count} problem{'s' if count != 1 else ''}\n")
            for line in e.problems:
                out.write(f"  {line}\n")
        return EXIT_FAILED
    summary = config_summary(config)
    if args.json:
        print_json({"ok": True, **summary}, out)
        return EXIT_OK
    out.write(f"ok: {args.file} (version {config.version})\n")
    listeners = ", ".join(
        f"{name} ({endpoint}, tls {tls})"
        for name, endpoint, tls in summary["listeners"]
    )
    out.write(f"  listeners: {listeners}\n")
    rules = summary["rules"]
    out.write(f"  rules: {len(rules)}")
    if rules:
        out.write(
            " ("
            + ", ".join(
                f"{r['name']}{'' if r['enabled'] else ' [disabled]'}" for r in rules
            )
            + ")"
        )
    out.write("\n")
    out.write(f"  core profiles: {', '.join(summary['core_profiles']) or '-'}\n")
    out.write(f"  relay profiles: {', '.join(summary['relay_profiles']) or '-'}\n")
    out.write(f"  spool: {config.spool.directory}\n")
    return EXIT_OK


def config_summary(config: GatewayConfig) -> dict[str, Any]:
    # Names and endpoints only: server URIs may carry API keys.
    return {
        "file": config.path,
        "version": config.version,
        "listeners": [(lc.name, lc.endpoint, lc.tls) for lc in config.listeners],
        "rules": [
            {
                "name": rule.name,
                "enabled": rule.enabled,
                "direction": rule.direction,
                "core_profile": rule.core_profile.name,
                "relay_profile": rule.relay_profile.name,
            }
            for rule in config.policy.rules
        ],
        "core_profiles": sorted(config.policy.core_profiles),
        "relay_profiles": sorted(config.policy.smtp_profiles),
    }


def quarantine_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **times(args),
        "sender": args.sender,
        "recipient": args.recipient,
        "subject": args.subject,
        "reason": args.reason,
        "rule": args.rule,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    data = client.call("GET", "/api/quarantine", query)
    if args.json:
        print_json(data, out)
        return EXIT_OK
    rows = [
        (
            q["id"],
            local_time(q["quarantined_at"]),
            q["message"]["sender"] or "<>",
            q["message"]["subject"],
            q["reason"],
            human_size(q["size"]),
            "yes" if q["pinned"] else "",
            local_time(q["released_at"]) if q["released_at"] else "",
        )
        for q in data["items"]
    ]
    if rows:
        out.write(
            table(
                (
                    "ID",
                    "QUARANTINED",
                    "SENDER",
                    "SUBJECT",
                    "REASON",
                    "SIZE",
                    "PINNED",
                    "RELEASED",
                ),
                rows,
                (32, 19, 32, 40, 24, 7, 6, 19),
            )
            + "\n"
        )
    out.write(page_footer(data, "quarantined") + "\n")
    return EXIT_OK


def quarantine_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    q = client.call("GET", f"/api/quarantine/{quote(args.id)}")
    if args.json:
        print_json(q, out)
        return EXIT_OK
    m = q["message"]
    out.write(
        fields(
            [
                ("id", q["id"]),
                ("reason", q["reason"]),
                ("quarantined", local_time(q["quarantined_at"])),
                ("expires", local_time(q["expires_at"])),
                ("size", f"{q['size']} bytes"),
                ("sha256", q["sha256"]),
                ("pinned", "yes" if q["pinned"] else "no"),
                ("released", local_time(q["released_at"])),
                ("released by", q["released_by"]),
                ("message", m["id"]),
                ("received", local_time(m["received_at"])),
                ("sender", m["sender"] or "<>"),
                ("recipients", ", ".join(m["recipients"])),
                ("subject", m["subject"]),
                ("rule", m["rule"]),
                ("status", m["status"]),
                ("verdict", m["verdict"] or "N/A"),
            ]
        )
        + "\n"
    )
    return EXIT_OK


def quarantine_action(action: str, done: str) -> Any:
    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        body: dict[str, Any] = {}
        if action == "forward":
            body["to"] = list(args.addresses)
        if args.force:
            body["force"] = True
        if args.key:
            body["idempotency_key"] = args.key
        data = client.call(
            "POST", f"/api/quarantine/{quote(args.id)}/{action}", body=body
        )
        if args.json:
            print_json(data, out)
        elif data.get("replayed"):
            out.write(
                f"{args.id}: {done} before with this key (queued as "
                f"{data['queue_id']}); nothing done again\n"
            )
        else:
            out.write(f"{args.id}: {done} (queued as {data['queue_id']})\n")
        return EXIT_OK

    return run


def quarantine_pin(pinned: bool) -> Any:
    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        data = client.call(
            "POST", f"/api/quarantine/{quote(args.id)}/pin", body={"pinned": pinned}
        )
        if args.json:
            print_json(data, out)
        else:
            out.write(f"{args.id}: {'pinned' if pinned else 'unpinned'}\n")
        return EXIT_OK

    return run


def quarantine_delete(
    client: AdminClient, args: argparse.Namespace, out: TextIO
) -> int:
    data = client.call("DELETE", f"/api/quarantine/{quote(args.id)}")
    if args.json:
        print_json(data, out)
    else:
        out.write(f"{args.id}: deleted\n")
    return EXIT_OK


def quarantine_download(
    client: AdminClient, args: argparse.Namespace, out: TextIO
) -> int:
    target = args.output or f"{args.id}.eml"
    partial = target + ".part"
    path = f"/api/quarantine/{quote(args.id)}/eml"
    try:
        with open(partial, "wb") as file:
            size = client.download(path, file)
        os.replace(partial, target)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    out.write(f"{target}: {size} bytes\n")
    return EXIT_OK


def messages_search(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **times(args),
        "sender": args.sender,
        "recipient": args.recipient,
        "subject": args.subject,
        "status": args.status or None,
        "verdict": args.verdict or None,
        "rule": args.rule,
        "direction": args.direction,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    data = client.call("GET", "/api/messages", query)
    if args.json:
        print_json(data, out)
        return EXIT_OK
    rows = [
        (
            m["id"],
            local_time(m["received_at"]),
            m["sender"] or "<>",
            ", ".join(m["recipients"]),
            m["subject"],
            m["status"],
            m["verdict"] or "N/A",
            m["rule"] or "-",
        )
        for m in data["items"]
    ]
    if rows:
        out.write(
            table(
                (
                    "ID",
                    "RECEIVED",
                    "SENDER",
                    "RECIPIENTS",
                    "SUBJECT",
                    "STATUS",
                    "VERDICT",
                    "RULE",
                ),
                rows,
                (28, 19, 32, 32, 40, 19, 9, 20),
            )
            + "\n"
        )
    out.write(page_footer(data, "messages") + "\n")
    return EXIT_OK


def messages_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    m = client.call("GET", f"/api/messages/{quote(args.id)}")
    if args.json:
        print_json(m, out)
        return EXIT_OK
    out.write(
        fields(
            [
                ("id", m["id"]),
                ("queue id", m["queue_id"]),
                ("received", local_time(m["received_at"])),
                ("client", f"{m['client_address']} ({m['helo']})"),
                ("sender", m["sender"] or "<>"),
                ("recipients", ", ".join(m["recipients"])),
                ("subject", m["subject"]),
                ("message-id", m["message_id_header"]),
                ("size", f"{m['size']} bytes"),
                ("rule", f"{m['rule'] or '-'} ({m['direction'] or '-'})"),
                ("status", m["status"]),
                ("verdict", m["verdict"] or "N/A"),
                ("quarantine", ", ".join(m["quarantine"])),
            ]
        )
        + "\n"
    )
    if m["parts"]:
        out.write("\nparts:\n")
        for p in m["parts"]:
            name = p["filename"] or p["content_type"]
            extra = f" ({p['blocked_reason']})" if p["blocked_reason"] else ""
            extra += " sanitized" if p["sanitized"] else ""
            out.write(f"  {p['part_id']}  {name}  {p['result']}{extra}\n")
    if m["deliveries"]:
        out.write("\ndeliveries:\n")
        for d in m["deliveries"]:
            reply = " ".join(str(x) for x in (d["code"], d["enhanced"], d["text"]) if x)
            out.write(f"  {d['recipient']}  {d['status']}  {reply}".rstrip() + "\n")
    if m["timeline"]:
        out.write("\ntimeline:\n")
        for event in m["timeline"]:
            out.write(f"  {local_time(event['at'])}  {event['text']}\n")
    return EXIT_OK


def refused_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **times(args),
        "client": args.client,
        "sender": args.sender,
        "recipient": args.recipient,
        "listener": args.listener,
        "category": args.category,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    data = client.call("GET", "/api/refused", query)
    if args.json:
        print_json(data, out)
        return EXIT_OK
    rows = [
        (
            local_time(r["at"]),
            r["client_address"],
            r["sender"] if r["sender"] is not None else "-",
            r["recipient"] or "-",
            f"{r['code']} {r['enhanced'] or ''}".strip(),
            r.get("category") or "-",
            r["reason"],
        )
        for r in data["items"]
    ]
    if rows:
        out.write(
            table(
                ("AT", "CLIENT", "SENDER", "RECIPIENT", "CODE", "CATEGORY", "REASON"),
                rows,
                (19, 39, 32, 32, 12, 20, 50),
            )
            + "\n"
        )
    out.write(page_footer(data, "refusals") + "\n")
    return EXIT_OK


def audit_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **times(args),
        "actor": args.actor,
        "action": args.action_name,
        "target": args.target,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    data = client.call("GET", "/api/audit", query)
    if args.json:
        print_json(data, out)
        return EXIT_OK
    rows = [
        (
            local_time(a["at"]),
            a["actor"],
            a["action"],
            a["target"],
            a["result"],
            a["detail"],
        )
        for a in data["items"]
    ]
    if rows:
        out.write(
            table(
                ("AT", "WHO", "ACTION", "TARGET", "RESULT", "DETAIL"),
                rows,
                (19, 20, 8, 34, 8, 60),
            )
            + "\n"
        )
    out.write(page_footer(data, "audit entries") + "\n")
    return EXIT_OK


def answer(e: CliError, status: int) -> dict[str, Any]:
    """
    The JSON that came with an expected error status; re-raise otherwise.
    """
    if e.status == status and isinstance(e.data, dict):
        return e.data
    raise e


def reload(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = client.call("POST", "/api/config/reload")
    except CliError as e:
        # 422: the file has problems; the running configuration stays.
        data = answer(e, 422)
    if args.json:
        print_json(data, out)
    elif data.get("loaded"):
        out.write("configuration reloaded\n")
        if data.get("restart_required"):
            keys = ", ".join(data["restart_required"])
            out.write(f"  changed, but in force only after a restart: {keys}\n")
    else:
        out.write("configuration NOT reloaded; the running one stays:\n")
        for line in data.get("problems", []):
            out.write(f"  {line}\n")
    return EXIT_OK if data.get("loaded") else EXIT_FAILED


def status(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = client.call("GET", "/readyz")
    except CliError as e:
        # 503: not ready, with the checks and reasons.
        data = answer(e, 503)
    ready = bool(data.get("ready"))
    if args.json:
        print_json(data, out)
    else:
        out.write("ready\n" if ready else "NOT ready\n")
        for name, ok in sorted(data.get("checks", {}).items()):
            out.write(f"  {name}: {'ok' if ok else 'failing'}\n")
        for reason in data.get("reasons", []):
            out.write(f"  {reason}\n")
        # Shared services: reported, not part of readiness.
        dependencies = data.get("dependencies", {})
        for kind in ("core", "relay"):
            for name, ok in sorted(dependencies.get(kind, {}).items()):
                out.write(f"  {kind} {name}: {'up' if ok else 'DOWN'}\n")
        if "store" in dependencies:
            out.write(f"  store: {'up' if dependencies['store'] else 'DOWN'}\n")
    return EXIT_OK if ready else EXIT_FAILED
