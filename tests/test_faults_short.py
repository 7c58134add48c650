"""
The short form of the fault-injection script, C{benchmarks/faults.py}: the
real gateway killed three times under load, MetaDefender Core and the
downstream server each gone for a few seconds, and (as root) the spool's
disk full. Whatever happens, mail that got its 250 is delivered, none of it
unscanned, and clients are only ever told to try again later (4xx).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import faults  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def assert_safe(report: faults.Report) -> None:
    """
    Nothing accepted was lost or delivered unscanned, no client got a 5xx,
    every message was accepted in the end, and the spool has no corrupt
    entries.
    """
    text = "\n".join(report.lines())
    assert report.accepted == report.sent, text
    assert report.lost == 0, text
    assert report.unscanned == 0, text
    assert report.five_xx == 0, text
    assert report.corrupt == 0, text
    assert all(
        reply == "connection" or reply.startswith("4")
        for reply in report.outage_replies
    ), text
    assert report.ok, text


def test_sigkill(tmp_path: Path) -> None:
    """
    The gateway is killed with SIGKILL three times while messages stream in
    and is restarted on the same spool each time: every message that got a
    250 is delivered (duplicates are allowed, loss is not), and every
    delivered copy carries a scan result.
    """
    report = faults.sigkill(tmp_path, faults.SHORT)
    assert_safe(report)
    assert report.delivered == report.accepted


def test_core_outage(tmp_path: Path) -> None:
    """
    With the Core emulator killed for a few seconds mid-load, the rule's
    default error handling (retry) holds the mail back: clients get 4xx at
    most, and everything is delivered scanned once Core is back.
    """
    report = faults.core_outage(tmp_path, faults.SHORT)
    assert_safe(report)
    assert report.delivered == report.accepted


def test_downstream_outage(tmp_path: Path) -> None:
    """
    With the downstream server killed for a few seconds mid-load, the
    gateway keeps accepting and delivers everything once the server is back.
    """
    report = faults.downstream_outage(tmp_path, faults.SHORT)
    assert_safe(report)
    assert report.delivered == report.accepted


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full(tmp_path: Path) -> None:
    """
    When the spool's disk (a small tmpfs) fills up mid-load, clients get
    C{452 4.3.1}, and once space is freed everything accepted before and
    after is delivered from an undamaged spool.
    """
    try:
        report = faults.disk_full(tmp_path, faults.SHORT)
    except faults.UnavailableError as e:
        pytest.skip(str(e))
    assert_safe(report)
    assert report.outage_replies.get(faults.DISK_FULL, 0) > 0
    assert report.delivered == report.accepted
