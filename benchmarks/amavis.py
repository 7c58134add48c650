"""
Postfix with amavisd-new as its content filter, the peer that scans, set
up for one benchmark run and taken down after it.

The classic after-queue filter: mail to 127.0.0.1:2535 is queued by
Postfix, handed to amavisd-new on 127.0.0.1:10024 (through a transport of
C{servers} processes), which decodes every MIME part and looks at its
name and type (the banned-file check: no virus scanner or signatures
are available offline, so virus and spam checks are bypassed), and
passes it back to Postfix on 127.0.0.1:10025, which queues it again and
relays it to its C{relayhost} (the benchmark's sink, as for the plain
relay of C{../shared/bench/setup-postfix.sh}).

Only when amavisd-new is installed and the run has root (it starts
amavisd as the C{amavis} user and edits Postfix's C{master.cf} with
C{postconf -M}); the three services it adds are removed again on exit,
also after a failure. amavisd gets a configuration file of its own in the
work folder (C{amavisd -c}), so the system's amavis configuration is
neither read nor changed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import Processes, listening, wait_listening

INBOUND_PORT = 2535
FILTER_PORT = 10024
REINJECT_PORT = 10025
TRANSPORT = "mdgw-bench-amavis"
USER = "amavis"

#: The C{master.cf} services of the path, as C{name/type}.
_SERVICES = (
    f"127.0.0.1:{INBOUND_PORT}/inet",
    f"{TRANSPORT}/unix",
    f"127.0.0.1:{REINJECT_PORT}/inet",
)


def amavisd_command() -> str | None:
    """
    The amavisd-new program, if installed.
    """
    return shutil.which("amavisd") or shutil.which("amavisd-new")


def unavailable() -> str | None:
    """
    Why the amavis path cannot be set up here, or C{None}.
    """
    if amavisd_command() is None:
        return "amavisd-new is not installed"
    if os.geteuid() != 0:
        return "setting up Postfix with amavisd-new needs root"
    if shutil.which("postconf") is None:
        return "Postfix's postconf is not installed"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER!r} user (the amavisd-new package creates it)"
    for port in (INBOUND_PORT, FILTER_PORT, REINJECT_PORT):
        if listening(port):
            return f"port {port} is taken by another program"
    return None


def amavisd_config(home: Path, servers: int) -> str:
    """
    A complete amavisd-new configuration for the benchmark: listen on
    loopback, hand mail back to Postfix, decode and check names and types,
    no virus, spam, DKIM, database or cache, logging to a file.
    """
    return f"""\
use strict;
# mdgateway benchmark: written for one run by benchmarks/amavis.py.
$MYHOME = '{home}';
$TEMPBASE = "$MYHOME/tmp";
$db_home = "$MYHOME/db";
$pid_file = "$MYHOME/var/amavisd.pid";
$lock_file = "$MYHOME/var/amavisd.lock";
$daemon_user = '{USER}';
$daemon_group = '{USER}';
$myhostname = 'amavis.bench.test';
$mydomain = 'bench.test';
@local_domains_maps = (['example.com']);
@mynetworks = qw(127.0.0.0/8);
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = {FILTER_PORT};
$forward_method = 'smtp:[127.0.0.1]:{REINJECT_PORT}';
$notify_method = $forward_method;
$max_servers = {servers};
$max_requests = 100;
@bypass_virus_checks_maps = (1);
@bypass_spam_checks_maps = (1);
@av_scanners = ();
@av_scanners_backup = ();
$banned_filename_re = new_RE(
  qr'^\\.(exe-ms|dll)$',
  qr'\\.[^./]*[A-Za-z][^./]*\\.\\s*(exe|vbs|pif|scr|bat|cmd|com|cpl)[.\\s]*$'i,
);
$enable_db = 0;
$enable_global_cache = 0;
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
$DO_SYSLOG = 0;
$LOGFILE = "$MYHOME/var/amavis.log";
$log_level = 0;
1;
"""


def postconf(*args: str) -> None:
    subprocess.run(["postconf", *args], check=True, capture_output=True, timeout=60)


def postfix_reload() -> None:
    subprocess.run(["postfix", "reload"], check=True, capture_output=True, timeout=60)


class AmavisPath:
    """
    The Postfix-amavisd-Postfix path for the length of a C{with} block;
    mail for it goes to L{INBOUND_PORT}.
    """

    def __init__(self, processes: Processes, work: Path, servers: int = 8) -> None:
        self._processes = processes
        # A home of its own, not under the run's private (0700) folder:
        # amavisd drops to its own user and must reach it.
        self._home = Path(tempfile.mkdtemp(prefix="mdgw-amavis-"))
        self._work = work
        self._servers = servers

    def __enter__(self) -> AmavisPath:
        program = amavisd_command()
        assert program is not None
        account = pwd.getpwnam(USER)
        # amavisd refuses a configuration in a folder it may write: the
        # home (with the config) stays root's, what it writes is its own.
        self._home.chmod(0o755)
        for folder in (self._home / "tmp", self._home / "db", self._home / "var"):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, account.pw_uid, account.pw_gid)
        config = self._home / "amavisd.conf"
        config.write_text(amavisd_config(self._home, self._servers))
        self._work.mkdir(parents=True, exist_ok=True)
        daemon = self._processes.popen(
            [program, "-c", str(config), "foreground"], self._work / "amavisd.log"
        )
        wait_listening(FILTER_PORT, 60, daemon)
        try:
            self._add_services()
            wait_listening(INBOUND_PORT, 30)
            wait_listening(REINJECT_PORT, 30)
        except BaseException:
            self._remove_services()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_services()
        shutil.rmtree(self._home, ignore_errors=True)

    def _add_services(self) -> None:
        inbound, transport, reinject = _SERVICES
        postconf("-M", f"{inbound}=127.0.0.1:{INBOUND_PORT} inet n - n - - smtpd")
        postconf(
            "-P",
            f"{inbound}/content_filter={TRANSPORT}:[127.0.0.1]:{FILTER_PORT}",
            f"{inbound}/syslog_name=postfix/bench-amavis-in",
        )
        postconf("-M", f"{transport}={TRANSPORT} unix - - n - {self._servers} smtp")
        postconf(
            "-P",
            f"{transport}/smtp_data_done_timeout=1200",
            f"{transport}/smtp_send_xforward_command=yes",
            f"{transport}/smtp_dns_support_level=disabled",
            f"{transport}/max_use=20",
        )
        postconf("-M", f"{reinject}=127.0.0.1:{REINJECT_PORT} inet n - n - - smtpd")
        postconf(
            "-P",
            f"{reinject}/content_filter=",
            f"{reinject}/syslog_name=postfix/bench-amavis-back",
            f"{reinject}/mynetworks=127.0.0.0/8",
            f"{reinject}/smtpd_recipient_restrictions=permit_mynetworks,reject",
            f"{reinject}/smtpd_relay_restrictions=permit_mynetworks,reject",
            f"{reinject}/smtpd_client_connection_count_limit=0",
            f"{reinject}/receive_override_options="
            "no_header_body_checks,no_unknown_recipient_checks,no_milters",
        )
        postfix_reload()

    def _remove_services(self) -> None:
        for service in _SERVICES:
            try:
                postconf("-MX", service)
            except subprocess.CalledProcessError:
                pass  # not there
        postfix_reload()
