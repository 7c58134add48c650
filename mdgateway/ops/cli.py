# -*- test-case-name: tests.test_cli -*-
"""
The C{mdgateway} command: check a configuration file, and talk to a running
gateway through its admin HTTP API.

A command-line tool is not the reactor, so it speaks HTTP with blocking
C{urllib.request}; every API command is one or two requests. Output is an
aligned table (local times, long columns cut) or, with C{--json}, the API's
JSON as it came.

Exit status: 0 done; 1 the gateway refused or failed (or the configuration
has problems); 2 bad usage; 3 the admin API cannot be reached; 4 the token
was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from mdgateway.config import GatewayConfig, load_config
from mdgateway.ops.console.userscli import add_commands as add_user_commands
from mdgateway.ops.tokens import TokenFileError, parse_tokens, pick_token
from mdgateway.tomlreader import ConfigError

DEFAULT_URL = "http://127.0.0.1:10080"
URL_ENV = "MDGATEWAY_ADMIN_URL"
TOKEN_ENV = "MDGATEWAY_ADMIN_TOKEN"
TOKEN_NAME_ENV = "MDGATEWAY_ADMIN_TOKEN_NAME"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4

_RELATIVE = re.compile(r"^\d+(?:\.\d+)?[smhd]$")
_EPOCH = re.compile(r"^\d+(?:\.\d+)?$")


class CliError(Exception):
    """
    Stop with C{message} on stderr and exit status C{code}.

    @ivar status: the HTTP status that caused it, if any.
    @ivar data: the API's JSON answer with that status, if any.
    """

    def __init__(
        self,
        message: str,
        code: int = EXIT_FAILED,
        status: int | None = None,
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.data = data


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


# --------------------------------------------------------------------------
# HTTP


class AdminClient:
    """
    A blocking client of the admin API.

    @param url: the API's base URL, e.g. C{http://127.0.0.1:10080}.
    @param token: the bearer token, or C{None}.
    @param cafile: CA certificates for an C{https} URL with a private CA.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 30.0,
        cafile: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._context = (
            ssl.create_default_context(cafile=cafile)
            if url.startswith("https:")
            else None
        )

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """
        The open response; raises L{CliError} for every failure.
        """
        url = self.url + path
        if query:
            pairs = [
                (key, str(item))
                for key, value in query.items()
                if value is not None
                for item in (value if isinstance(value, list) else [value])
            ]
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data, headers, method=method)
        try:
            return urllib.request.urlopen(
                request, timeout=self.timeout, context=self._context
            )
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(
                f"cannot reach the admin API at {self.url}: {reason}",
                EXIT_UNREACHABLE,
            ) from None

    def _refused(self, e: urllib.error.HTTPError) -> CliError:
        data: Any = None
        try:
            data = json.loads(e.read(65536).decode("utf-8"))
        except (OSError, ValueError):
            pass
        finally:
            e.close()
        detail = data.get("error") if isinstance(data, dict) else None
        detail = detail or e.reason
        if e.code == 401:
            if not self.token:
                return CliError(
                    f"no token: the admin API needs one (--token-file or {TOKEN_ENV})",
                    EXIT_UNAUTHORIZED,
                )
            return CliError(
                f"token refused by the admin API at {self.url}", EXIT_UNAUTHORIZED
            )
        return CliError(f"{detail} (HTTP {e.code})", status=e.code, data=data)

    def call(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """
        One API call; its decoded JSON answer.
        """
        with self._request(method, path, query, body) as response:
            raw = response.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise CliError(f"the admin API at {self.url} sent no JSON") from None

    def download(self, path: str, out: Any) -> int:
        """
        Stream a download into the binary file C{out}; the bytes written.
        """
        written = 0
        with self._request("GET", path) as response:
            while chunk := response.read(65536):
                out.write(chunk)
                written += len(chunk)
        return written


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# --------------------------------------------------------------------------
# Formatting


def local_time(value: str | None) -> str:
    """
    An API time (ISO-8601 UTC) as local ISO time to the second; C{-} for
    none.
    """
    if not value:
        return "-"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    return when.astimezone().replace(tzinfo=None).isoformat(timespec="seconds")


def human_size(size: int | None) -> str:
    """
    C{1536} as C{1.5K}.
    """
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(size)  # pragma: no cover


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], widths: Sequence[int]
) -> str:
    """
    Rows aligned under their headers; a cell longer than its column's
    width is cut with C{...}. No trailing spaces.
    """
    cells = [
        [_cut(" ".join(str(c).split()), w) for c, w in zip(row, widths, strict=True)]
        for row in rows
    ]
    sizes = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        padded = [c.ljust(sizes[i]) for i, c in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _fields(pairs: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(
        f"{k.ljust(width)}  {'-' if v in (None, '') else v}" for k, v in pairs
    )


def _page_footer(data: Mapping[str, Any], what: str) -> str:
    shown, total = len(data["items"]), data["total"]
    line = f"{shown} of {total} {what}"
    if data.get("next_cursor"):
        line += f"; next page: --cursor {data['next_cursor']}"
    return line


# --------------------------------------------------------------------------
# Commands


def _time_arg(text: str) -> str:
    """
    A time option as the API takes it: relative (C{2h}) and epoch seconds
    as given; an ISO time without offset is the local time zone's.
    """
    text = text.strip()
    if _RELATIVE.match(text) or _EPOCH.match(text):
        return text
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(
            f"not a time: {text!r} (ISO-8601, epoch seconds, or 30m/2h/7d ago)",
            EXIT_USAGE,
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.isoformat()


def _times(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "since": _time_arg(args.since) if args.since else None,
        "until": _time_arg(args.until) if args.until else None,
    }


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    try:
        config = load_config(args.file, check_files=not args.no_check_files)
    except ConfigError as e:
        if args.json:
            _print_json({"ok": False, "problems": list(e.problems)}, out)
        else:
            count = len(e.problems)
            out.write(f"{args.file}: {count} problem{'s' if count != 1 else ''}\n")
            for line in e.problems:
                out.write(f"  {line}\n")
        return EXIT_FAILED
    summary = _config_summary(config)
    if args.json:
        _print_json({"ok": True, **summary}, out)
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


def _config_summary(config: GatewayConfig) -> dict[str, Any]:
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


def _print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _queue_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    data = client.call("GET", "/api/queue")
    if args.json:
        _print_json(data, out)
        return EXIT_OK
    if not data["items"]:
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
            local_time(e["next_attempt"]),
            e["last_error"] or "-",
        )
        for e in data["items"]
    ]
    if any(e.get("worker") for e in data["items"]):
        # Several processes ([processes] workers): say whose spool.
        headings, widths = ("PROC", *headings), (4, *widths)
        rows = [
            (e.get("worker", 0), *row)
            for e, row in zip(data["items"], rows, strict=True)
        ]
    out.write(table(headings, rows, widths) + "\n")
    out.write(f"{len(rows)} queued\n")
    return EXIT_OK


def _queue_retry(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    data = client.call("POST", f"/api/queue/{_quote(args.id)}/retry")
    if args.json:
        _print_json(data, out)
    else:
        out.write(f"{args.id}: retrying now\n")
    return EXIT_OK


def _quarantine_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **_times(args),
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
        _print_json(data, out)
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
    out.write(_page_footer(data, "quarantined") + "\n")
    return EXIT_OK


def _quarantine_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    q = client.call("GET", f"/api/quarantine/{_quote(args.id)}")
    if args.json:
        _print_json(q, out)
        return EXIT_OK
    m = q["message"]
    out.write(
        _fields(
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


def _quarantine_action(action: str, done: str) -> Any:
    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        body: dict[str, Any] = {}
        if action == "forward":
            body["to"] = list(args.addresses)
        if args.force:
            body["force"] = True
        if args.key:
            body["idempotency_key"] = args.key
        data = client.call(
            "POST", f"/api/quarantine/{_quote(args.id)}/{action}", body=body
        )
        if args.json:
            _print_json(data, out)
        elif data.get("replayed"):
            out.write(
                f"{args.id}: {done} before with this key (queued as "
                f"{data['queue_id']}); nothing done again\n"
            )
        else:
            out.write(f"{args.id}: {done} (queued as {data['queue_id']})\n")
        return EXIT_OK

    return run


def _audit_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **_times(args),
        "actor": args.actor,
        "action": args.action_name,
        "target": args.target,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    data = client.call("GET", "/api/audit", query)
    if args.json:
        _print_json(data, out)
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
    out.write(_page_footer(data, "audit entries") + "\n")
    return EXIT_OK


def _quarantine_pin(pinned: bool) -> Any:
    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        data = client.call(
            "POST", f"/api/quarantine/{_quote(args.id)}/pin", body={"pinned": pinned}
        )
        if args.json:
            _print_json(data, out)
        else:
            out.write(f"{args.id}: {'pinned' if pinned else 'unpinned'}\n")
        return EXIT_OK

    return run


def _quarantine_delete(
    client: AdminClient, args: argparse.Namespace, out: TextIO
) -> int:
    data = client.call("DELETE", f"/api/quarantine/{_quote(args.id)}")
    if args.json:
        _print_json(data, out)
    else:
        out.write(f"{args.id}: deleted\n")
    return EXIT_OK


def _quarantine_download(
    client: AdminClient, args: argparse.Namespace, out: TextIO
) -> int:
    target = args.output or f"{args.id}.eml"
    partial = target + ".part"
    path = f"/api/quarantine/{_quote(args.id)}/eml"
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


def _messages_search(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **_times(args),
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
        _print_json(data, out)
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
    out.write(_page_footer(data, "messages") + "\n")
    return EXIT_OK


def _messages_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    m = client.call("GET", f"/api/messages/{_quote(args.id)}")
    if args.json:
        _print_json(m, out)
        return EXIT_OK
    out.write(
        _fields(
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


def _refused_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {
        **_times(args),
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
        _print_json(data, out)
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
    out.write(_page_footer(data, "refusals") + "\n")
    return EXIT_OK


def _answer(e: CliError, status: int) -> dict[str, Any]:
    """
    The JSON that came with an expected error status; re-raise otherwise.
    """
    if e.status == status and isinstance(e.data, dict):
        return e.data
    raise e


def _reload(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = client.call("POST", "/api/config/reload")
    except CliError as e:
        # 422: the file has problems; the running configuration stays.
        data = _answer(e, 422)
    if args.json:
        _print_json(data, out)
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


def _status(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = client.call("GET", "/readyz")
    except CliError as e:
        # 503: not ready, with the checks and reasons.
        data = _answer(e, 503)
    ready = bool(data.get("ready"))
    if args.json:
        _print_json(data, out)
    else:
        out.write("ready\n" if ready else "NOT ready\n")
        for name, ok in sorted(data.get("checks", {}).items()):
            out.write(f"  {name}: {'ok' if ok else 'failing'}\n")
        for reason in data.get("reasons", []):
            out.write(f"  {reason}\n")
    return EXIT_OK if ready else EXIT_FAILED


# --------------------------------------------------------------------------
# Arguments


def _parser() -> _Parser:
    parser = _Parser(
        prog="mdgateway",
        description="Check mdgateway configuration and operate a running gateway.",
    )
    parser.add_argument(
        "--url",
        help=f"admin API base URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        help=f"file holding the admin API token (default: ${TOKEN_ENV})",
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
    check.add_argument("file")
    check.add_argument(
        "--no-check-files",
        action="store_true",
        help="do not check that the files it names exist (a file for another host)",
    )
    check.set_defaults(local=_check_config)

    commands.add_parser("status", help="is the gateway ready?").set_defaults(
        run=_status
    )
    commands.add_parser("reload", help="reload the configuration file").set_defaults(
        run=_reload
    )

    queue = commands.add_parser("queue", help="the spool").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    queue.add_parser("list", help="list queued messages").set_defaults(run=_queue_list)
    retry = queue.add_parser("retry", help="try a queued message now")
    retry.add_argument("id")
    retry.set_defaults(run=_queue_retry)

    quarantine = commands.add_parser("quarantine", help="quarantined originals")
    actions = quarantine.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list quarantined originals")
    _time_options(listing)
    for name in ("sender", "recipient", "subject", "reason", "rule"):
        listing.add_argument(f"--{name}")
    _page_options(listing)
    listing.set_defaults(run=_quarantine_list)
    for name, run, text in (
        ("show", _quarantine_show, "show one item"),
        ("release", _quarantine_action("release", "released"), "deliver the original"),
        ("rescan", _quarantine_action("rescan", "rescanning"), "scan it again"),
        ("pin", _quarantine_pin(True), "exempt from cleanup"),
        ("unpin", _quarantine_pin(False), "no longer exempt from cleanup"),
        ("delete", _quarantine_delete, "delete for good"),
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
    forward.set_defaults(run=_quarantine_action("forward", "forwarded"))
    download = actions.add_parser("download", help="save the original as .eml")
    download.add_argument("id")
    download.add_argument("-o", "--output", help="file to write (default: ID.eml)")
    download.set_defaults(run=_quarantine_download)

    messages = commands.add_parser("messages", help="the email history")
    maction = messages.add_subparsers(dest="action", metavar="ACTION", required=True)
    search = maction.add_parser("search", help="search the history")
    _time_options(search)
    for name in ("sender", "recipient", "subject", "rule", "direction"):
        search.add_argument(f"--{name}")
    search.add_argument("--status", action="append", help="repeatable")
    search.add_argument("--verdict", action="append", help="repeatable")
    _page_options(search)
    search.set_defaults(run=_messages_search)
    show = maction.add_parser("show", help="one history entry in full")
    show.add_argument("id")
    show.set_defaults(run=_messages_show)

    refused = commands.add_parser("refused", help="the refused log")
    raction = refused.add_subparsers(dest="action", metavar="ACTION", required=True)
    rlist = raction.add_parser("list", help="list refusals")
    _time_options(rlist)
    for name in ("client", "sender", "recipient", "listener", "category"):
        rlist.add_argument(f"--{name}")
    _page_options(rlist)
    rlist.set_defaults(run=_refused_list)

    audit = commands.add_parser("audit", help="what operators did")
    aaction = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    alist = aaction.add_parser("list", help="list audit entries")
    _time_options(alist)
    alist.add_argument("--actor", help="the name of the operator's token")
    alist.add_argument("--action", dest="action_name", help="release, pin, ...")
    alist.add_argument("--target", help="a quarantine item or queue id")
    _page_options(alist)
    alist.set_defaults(run=_audit_list)
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


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                text = file.read()
        except OSError as e:
            raise CliError(
                f"cannot read token file {args.token_file}: {e.strerror}", EXIT_USAGE
            ) from None
        if not text.strip():
            raise CliError(f"token file {args.token_file} is empty", EXIT_USAGE)
        name = args.token_name or environ.get(TOKEN_NAME_ENV) or None
        try:
            return pick_token(parse_tokens(text, args.token_file), name)
        except TokenFileError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    return environ.get(TOKEN_ENV, "").strip() or None


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
    @param environ: where C{MDGATEWAY_ADMIN_URL} and C{MDGATEWAY_ADMIN_TOKEN}
        are looked up (default: C{os.environ}).
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
            status: int = args.local(args, out)
            return status
        client = AdminClient(
            args.url or env.get(URL_ENV) or DEFAULT_URL,
            _token(args, env),
            timeout=args.timeout,
            cafile=args.cafile,
        )
        status = args.run(client, args, out)
        return status
    except CliError as e:
        err.write(f"mdgateway: {e.message}\n")
        return e.code
    except KeyboardInterrupt:
        err.write("mdgateway: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
