"""
testssl.sh's client simulations against the gateway: which real clients
(Android, Java, Go, OpenSSL, Apple Mail, Thunderbird...) complete a
handshake on STARTTLS and on implicit TLS, with which protocol and cipher.

    python3 benchmarks/tls.py [--testssl testssl]

Not part of the test suite (it takes a minute and needs testssl.sh); the
suite drives openssl s_client and smtplib instead. Each client that gets
"No connection" should be one the TLS policy refuses on purpose (TLS 1.0
only, such as Java 7): the gateway logs the refusal.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gatewayproc import GatewayProcess, default_toml, free_port  # noqa: E402

_LINE = re.compile(r"^ (\S.{27}) (.+)$")


def simulate(testssl: str, port: int, starttls: bool) -> list[tuple[str, str]]:
    """
    The (client, outcome) rows of testssl's client simulation.
    """
    command = [testssl, "--quiet", "--color", "0", "--warnings", "off", "-c"]
    if starttls:
        command += ["--starttls", "smtp"]
    result = subprocess.run(
        [*command, f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = []
    started = False
    for line in result.stdout.splitlines():
        if "Running client simulations" in line:
            started = True
            continue
        match = _LINE.match(line)
        if started and match and not line.startswith(" Done"):
            rows.append((match.group(1).strip(), match.group(2).strip()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testssl", default=shutil.which("testssl") or "testssl.sh")
    args = parser.parse_args(argv)
    if shutil.which(args.testssl) is None:
        print(f"{args.testssl} not found: install testssl.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        starttls, implicit = free_port(), free_port()
        config = folder / "mdgateway.toml"
        config.write_text(
            default_toml(
                starttls,
                folder / "spool",
                extra=f"""
[[listeners]]
name = "smtps"
endpoint = "tcp:{implicit}:interface=127.0.0.1"
tls = "implicit"
""",
            )
        )
        gw = GatewayProcess(config, folder / "gateway.log")
        gw.start(starttls)
        try:
            results = {
                "STARTTLS (opportunistic)": simulate(args.testssl, starttls, True),
                "implicit (intermediate)": simulate(args.testssl, implicit, False),
            }
        finally:
            gw.terminate()
        refused = [
            e for e in gw.log_events() if e["msg"].startswith("TLS handshake failed")
        ]
    for name, rows in results.items():
        print(f"\n{name}")
        for client, outcome in rows:
            print(f"  {client:<28} {outcome}")
        failed = [c for c, o in rows if o == "No connection"]
        print(f"  {len(rows) - len(failed)} of {len(rows)} clients connect")
    reasons = sorted({e["tls_error"] for e in refused})
    print(f"\nrefusals logged: {len(refused)} ({'; '.join(reasons)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
