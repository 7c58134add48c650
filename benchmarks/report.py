"""
The report of C{benchmarks/run.py}: the throughput table with its peers,
small-message latency, memory, the figures issue 18 sets targets for, and
the gateway's complaints, printed from the run's results.
"""

from __future__ import annotations

from typing import Any

MiB = 1024 * 1024

#: The Core stand-ins of C{--core}: the emulator scanning each file, and
#: the instant one that answers without reading it.
SCANNING = "scanning"
INSTANT = "instant"
CORE_MODES = (INSTANT, SCANNING)

#: The peers beside the gateway, by their C{--peers} name.
PEER_NAMES = {
    "postfix": "Postfix's plain relay",
    "amavis": "Postfix with amavisd-new",
}


def print_throughput(rows: list[dict[str, Any]], peers: dict[str, str | None]) -> None:
    print("\nthroughput: smtp-source start until the sink has every message")
    print(
        "(Core: the instant stand-in or the scanning emulator; CPU ms/msg: the"
        " gateway's processes without the Core emulator (gw), and the"
        " emulator's (Core); req/file: Core requests per scanned file;"
        " peers in msg/s, with the gateway's ratio to them)"
    )
    print(
        f"{'scenario':32} {'Core':8} {'count':>5} {'mdgw s':>7} {'msg/s':>7}"
        f" {'MB/s':>6} {'gw ms':>6} {'Core ms':>7} {'req/file':>8} {'box%':>4}"
        f" {'postfix':>8} {'ratio':>5} {'amavis':>7} {'ratio':>5}"
    )
    for row in rows:
        ours = row["gateway"]
        line = f"{row['label']:32} {row.get('core', SCANNING):8} {row['count']:>5} "
        if ours.get("ok"):
            per_file = ours.get("core_requests_per_file")
            line += (
                f"{ours['seconds']:7.2f} {ours['msg_per_s']:7.1f}"
                f" {ours.get('mb_per_s', 0):6.1f}"
                f" {ours.get('process_cpu_ms_per_msg', 0):6.1f}"
                f" {ours.get('core_cpu_ms_per_msg', 0):7.1f}"
                f" {'-' if per_file is None else f'{per_file:.2f}':>8}"
                f" {ours.get('box_cpu_pct', 0):4.0f}"
            )
        else:
            line += f"{'failed':>7} {'':7} {'':6} {'':6} {'':7} {'':8} {'':4}"
        for peer, width in (("postfix", 8), ("amavis", 7)):
            theirs = row.get(peer) or {}
            if theirs.get("ok"):
                line += f" {theirs['msg_per_s']:{width}.1f}"
                ratio = _ratio(ours, theirs)
                line += f" {ratio:5.2f}" if ratio is not None else f" {'':5}"
            elif theirs:
                line += f" {'failed':>{width}} {'':5}"
            else:
                line += f" {'-':>{width}} {'':5}"
        print(line)
    for peer, why in peers.items():
        if why is not None:
            print(f"  {PEER_NAMES[peer]} left out: {why}")
    for row in rows:
        for who in ("gateway", "postfix", "amavis"):
            r = row.get(who) or {}
            if r.get("error"):
                print(f"  {row['label']}, {row.get('core')} ({who}): {r['error']}")


def _ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    if ours.get("ok") and theirs.get("ok") and theirs["msg_per_s"]:
        return float(ours["msg_per_s"]) / float(theirs["msg_per_s"])
    return None


def _row(
    rows: list[dict[str, Any]], key: str, core: str, workers: int
) -> dict[str, Any] | None:
    for row in rows:
        if (row["key"], row.get("core"), row["workers"]) == (key, core, workers):
            return row
    return None


def print_targets(report: dict[str, Any]) -> None:
    """
    The figures issue 18 sets targets for, each beside its target (none is
    asserted: the machine is shared and noisy).
    """
    rows = report.get("throughput", [])
    lines: list[tuple[str, str, str]] = []

    def ok(row: dict[str, Any] | None) -> dict[str, Any]:
        result = (row or {}).get("gateway") or {}
        return result if result.get("ok") else {}

    def peer_ratio(row: dict[str, Any] | None, peer: str) -> str:
        ratio = _ratio(ok(row), (row or {}).get(peer) or {})
        return "-" if ratio is None else f"{ratio:.2f}x"

    workers = sorted({row["workers"] for row in rows})
    for n in workers:
        proc = f"{n} proc"
        text_i, text_s = _row(rows, "text", INSTANT, n), _row(rows, "text", SCANNING, n)
        for name, row in (("instant", text_i), ("scanning", text_s)):
            if row:
                lines.append(
                    (
                        f"10 KiB text, {proc}, {name} Core: vs Postfix relay",
                        peer_ratio(row, "postfix"),
                        ">= 0.5x",
                    )
                )
        if text_i and ok(text_i):
            lines.append(
                (
                    f"10 KiB text, {proc}, instant Core: gateway CPU per message",
                    f"{ok(text_i).get('process_cpu_ms_per_msg')} ms",
                    "<= 4 ms",
                )
            )
        attach_i = _row(rows, "attach", INSTANT, n)
        attach_s = _row(rows, "attach", SCANNING, n)
        if attach_i:
            lines.append(
                (
                    f"1 MiB attachment, {proc}, instant Core: vs Postfix relay",
                    peer_ratio(attach_i, "postfix"),
                    ">= 0.5x",
                )
            )
        if attach_s:
            lines.append(
                (
                    f"1 MiB attachment, {proc}, scanning: vs Postfix + amavisd-new",
                    peer_ratio(attach_s, "amavis"),
                    ">= 1.0x",
                )
            )
        slow = ok(_row(rows, "text-200ms", SCANNING, n))
        fast = ok(text_s)
        if slow and fast:
            lines.append(
                (
                    f"10 KiB text, {proc}: Core 200 ms vs 0 ms throughput",
                    f"{slow['msg_per_s'] / fast['msg_per_s']:.2f}",
                    ">= 0.80",
                )
            )
        big = ok(_row(rows, "big", INSTANT, n))
        if big:
            lines.append(
                (
                    f"25 MiB attachment, {proc}, instant Core",
                    f"{big.get('mb_per_s')} MB/s",
                    ">= 40 MB/s",
                )
            )
    per_file = sorted(
        {
            ok(row).get("core_requests_per_file")
            for row in rows
            if row.get("core") == SCANNING and ok(row).get("core_files")
        }
        - {None}
    )
    if per_file:
        lines.append(
            (
                "Core requests per scanned file (scanning runs)",
                " / ".join(f"{v:g}" for v in per_file),
                "1 (sync submit)",
            )
        )
    for label, result in report.get("latency", {}).items():
        if label == "postfix" or "idle" not in result:
            continue
        idle = result["idle"]["data_to_delivered_ms"]
        loaded = result["loaded"]["data_to_delivered_ms"]
        lines.append(
            (
                f"small message DATA->delivered, idle p50 ({label})",
                f"{idle['p50']} ms",
                "< 50 ms",
            )
        )
        lines.append(
            (
                "  ... while 25 MiB messages flow, p50 / p99",
                f"{loaded['p50']} / {loaded['p99']} ms",
                "p99 < 1000 ms",
            )
        )
    memory = report.get("memory") or {}
    if "rss_idle_sessions_kib" in memory:
        lines.append(
            (
                f"gateway memory with {memory['sessions']} idle sessions",
                f"{memory['rss_idle_sessions_kib'] / 1024:.1f} MiB",
                "< 150 MB",
            )
        )
    if not lines:
        return
    print("\nissue 18's figures, each beside its target (compare runs; not asserted)")
    for what, figure, target in lines:
        print(f"  {what:62} {figure:>16}   target {target}")


def print_latency(results: dict[str, Any]) -> None:
    print("\nsmall-message latency in ms (10 KiB, one session each, 10 a second)")
    print(
        f"{'setup':24} {'other traffic':14} {'from DATA to':13}"
        f" {'p50':>7} {'p99':>7} {'max':>7} {'n':>4}"
    )
    for who, r in results.items():
        if not r or "idle" not in r:
            if r:
                print(f"{who:24} failed: {r.get('error')}")
            continue
        name = who
        for phase, label in (("idle", "none"), ("loaded", "25 MiB msgs")):
            for key, what in (
                ("data_to_250_ms", "250"),
                ("data_to_delivered_ms", "delivered"),
            ):
                s = r[phase][key]
                figures = f"{s['p50']:7.1f} {s['p99']:7.1f} {s['max']:7.1f}"
                print(f"{name:24} {label:14} {what:13} {figures} {s['n']:>4}")
                name = ""
        print(
            f"  {r['big_delivered_during_probes']} big messages delivered during "
            f"the probes ({r['big_mb_per_s']} MB/s); refused probes: "
            f"{r['loaded']['probes'] - r['loaded']['accepted']}"
        )
        if r.get("error"):
            print(f"  error: {r['error']}")


def print_memory(m: dict[str, Any]) -> None:
    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f} MiB"

    print("\ngateway resident memory (VmRSS; the Core emulator is a separate process)")
    print(f"  at start:                       {mib(m['rss_start_kib'])}")
    print(
        f"  with {m['sessions']} idle sessions:       {mib(m['rss_idle_sessions_kib'])}"
        f" ({m['kib_per_session']} KiB per session)"
    )
    before = f"before a {m['big_size'] // MiB} MiB message:"
    print(f"  {before:32}{mib(m['rss_before_big_kib'])}")
    print(f"  peak while it passes (VmHWM):   {mib(m['rss_peak_big_kib'])}")
    print(f"  after it was delivered:         {mib(m['rss_after_big_kib'])}")
    if "big_data_to_250_s" in m:
        print(
            f"  its DATA to 250: {m['big_data_to_250_s']} s, "
            f"DATA to delivered: {m.get('big_data_to_delivered_s')} s"
        )
    if m.get("error"):
        print(f"  error: {m['error']}")


def print_problems(report: dict[str, Any]) -> None:
    print("\ngateway log errors/criticals and spool leftovers per run")
    found = False
    for name, r in _gateway_runs(report):
        if (
            r.get("log_problems")
            or r.get("spool_leftovers")
            or not r.get("queue_drained", True)
        ):
            found = True
            print(
                f"  {name}: {r.get('log_problems', 0)} error/critical events, "
                f"leftovers {r.get('spool_leftovers')}, "
                f"queue drained: {r.get('queue_drained')}"
            )
            for sample in r.get("log_problem_samples", []):
                print(f"    {sample[:200]}")
    if not found:
        print("  none")


def _gateway_runs(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    runs = [(row["label"], row["gateway"]) for row in report.get("throughput", [])]
    for label, result in report.get("latency", {}).items():
        if label != "postfix":
            runs.append((f"latency, {label}", result))
    if report.get("memory"):
        runs.append(("memory", report["memory"]))
    return runs
