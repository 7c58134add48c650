# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics for one gateway, on a registry of its own.

Components call the explicit methods of L{Metrics} (C{session_opened},
C{refused}, C{core_scan}, ...) instead of touching prometheus-client
objects, so metric names and labels live in one place and every label value
is bounded here: free text (reply texts, verdict strings, TLS versions) is
mapped onto a short fixed vocabulary, with C{other} for anything unknown,
and names that come from the configuration (listeners, rules, profiles) are
cut to a bounded length. A scrape therefore never grows with the traffic.

The registry is private to each L{Metrics}, never prometheus-client's global
one, so several gateways embedded in one process (and parallel tests) keep
separate counts.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.logger import Logger

from mdgateway.smtp.categories import REFUSAL_CATEGORIES

__all__ = [
    "CACHE_RESULTS",
    "CDR_OUTCOMES",
    "CORE_CONDITIONS",
    "CORE_OUTCOMES",
    "DLP_OUTCOMES",
    "Metrics",
    "REFUSAL_REASONS",
    "VERDICTS",
]

#: The C{reason} label of C{mdgateway_smtp_refused_total}: the refusal
#: categories of L{mdgateway.smtp.categories}.
REFUSAL_REASONS = REFUSAL_CATEGORIES

_log = Logger()

#: Label used for any value outside a label's vocabulary.
OTHER = "other"

#: Longest label value taken from configuration names.
MAX_NAME = 64

#: The C{outcome} label of C{mdgateway_core_scan_seconds}.
CORE_OUTCOMES = frozenset({"allowed", "blocked", "sanitized", "error"})

#: The C{result} label of C{mdgateway_core_cache_total}: a kept verdict
#: reused, one shared with an identical file scanned at the same time, or
#: a new scan (see L{mdgateway.scan.cache}).
CACHE_RESULTS = frozenset({"hit", "shared", "miss"})

#: The C{condition} label of C{mdgateway_core_errors_total}: the Core
#: client's error conditions (L{mdgateway.scan.errors.Condition} values).
CORE_CONDITIONS = frozenset(
    {
        "unreachable",
        "busy",
        "scan_timeout",
        "processing_failed",
        "not_scanned",
        "access_denied",
    }
)

#: The C{result} label of C{mdgateway_verdicts_total}, as the product
#: spells message verdicts in its headers and history.
VERDICTS = ("Allowed", "Blocked", "Sanitized", "Bypassed", "Failed", "Skipped")
_VERDICT_BY_FOLD = {v.casefold(): v for v in VERDICTS}

#: The C{outcome} label of C{mdgateway_cdr_total}: Deep CDR rebuilt the
#: part, had nothing to change, failed, or was not asked for.
CDR_OUTCOMES = frozenset({"sanitized", "unchanged", "failed", "skipped"})

#: The C{outcome} label of C{mdgateway_dlp_total}: no sensitive data,
#: sensitive data found, found and redacted, DLP failed, or not asked for.
DLP_OUTCOMES = frozenset({"clean", "hits", "redacted", "failed", "skipped"})

_TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})

#: Seconds: Core answers in well under a second for a hash hit, and a big
#: archive through Deep CDR can take minutes.
_SCAN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _text(value: object) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    return "" if value is None else str(value)


def _name(value: object) -> str:
    """
    A configuration name as a label value: bounded, never empty.
    """
    text = _text(value)
    return text[:MAX_NAME] if text else "none"


def _word(value: object, vocabulary: frozenset[str]) -> str:
    text = _text(value).strip().lower()
    return text if text in vocabulary else OTHER


class _Watched:
    """
    The gauges whose values the service supplies through callbacks,
    computed at scrape time.
    """

    def __init__(self) -> None:
        self.queue_depth: Callable[[], float] | None = None
        self.queue_oldest: Callable[[], float | None] | None = None
        self.core_up: Callable[[], Mapping[str, float]] | None = None
        self.throttled: Callable[[], Mapping[str, bool | float]] | None = None
        self.workers: Callable[[], float] | None = None
        self.outbox_depth: Callable[[], float] | None = None
        self.outbox_oldest: Callable[[], float] | None = None
        self.relay_up: Callable[[], Mapping[str, bool]] | None = None
        self.store_up: Callable[[], bool | None] | None = None

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "mdgateway_queue_depth", "Messages in the spool, not yet done."
            ),
            GaugeMetricFamily(
                "mdgateway_queue_oldest_seconds",
                "Age of the oldest message in the spool (0 when empty).",
            ),
            GaugeMetricFamily(
                "mdgateway_core_servers_up",
                "Healthy MetaDefender Core servers in each Core profile.",
                labels=["profile"],
            ),
            GaugeMetricFamily(
                "mdgateway_relay_throttled",
                "1 while an SMTP relay profile is throttled (e.g. 4.7.500).",
                labels=["profile"],
            ),
            GaugeMetricFamily(
                "mdgateway_workers_running",
                "Worker processes running beside the primary ([processes] workers).",
            ),
            GaugeMetricFamily(
                "mdgateway_outbox_depth",
                "Records (history, refusals, quarantined originals) kept on "
                "local disk, not yet in the store.",
            ),
            GaugeMetricFamily(
                "mdgateway_outbox_oldest_seconds",
                "Age of the oldest record not yet in the store (0 when none).",
            ),
            GaugeMetricFamily(
                "mdgateway_relay_up",
                "1 while some server of an SMTP relay profile answered lately.",
                labels=["profile"],
            ),
            GaugeMetricFamily(
                "mdgateway_store_up",
                "1 while the store (history, quarantine) answers its check.",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        (
            depth,
            oldest,
            core_up,
            throttled,
            workers,
            outbox_depth,
            outbox_oldest,
            relay_up,
            store_up,
        ) = self._families()
        value = _call(self.queue_depth, "queue_depth")
        if value is not None:
            depth.add_metric([], float(value))
            yield depth
        if self.queue_oldest is not None:
            age = _call(self.queue_oldest, "queue_oldest_seconds", missing=0.0)
            if age is not None:
                oldest.add_metric([], float(age))
                yield oldest
        up = _call(self.core_up, "core_servers_up")
        if up is not None:
            for profile, count in sorted(up.items()):
                core_up.add_metric([_name(profile)], float(count))
            yield core_up
        flags = _call(self.throttled, "relay_throttled")
        if flags is not None:
            for profile, flag in sorted(flags.items()):
                throttled.add_metric([_name(profile)], float(flag))
            yield throttled
        running = _call(self.workers, "workers_running")
        if running is not None:
            workers.add_metric([], float(running))
            yield workers
        for family, callback, what in (
            (outbox_depth, self.outbox_depth, "outbox_depth"),
            (outbox_oldest, self.outbox_oldest, "outbox_oldest_seconds"),
        ):
            found = _call(callback, what)
            if found is not None:
                family.add_metric([], float(found))
                yield family
        healthy = _call(self.relay_up, "relay_up")
        if healthy is not None:
            for profile, flag in sorted(healthy.items()):
                relay_up.add_metric([_name(profile)], float(flag))
            yield relay_up
        store = _call(self.store_up, "store_up")
        if store is not None:
            store_up.add_metric([], float(store))
            yield store_up


def _call(callback: Callable[[], Any] | None, what: str, missing: Any = None) -> Any:
    """
    Run one gauge callback; a failing callback costs its gauge, not the
    whole scrape.
    """
    if callback is None:
        return None
    try:
        value = callback()
    except Exception:
        _log.failure("Metrics callback {what} failed", what=what)
        return None
    return missing if value is None else value


class Metrics:
    """
    The gateway's counters, histograms and gauges.

    Every method is cheap and never raises for an unexpected label value:
    it is counted under C{other} instead.

    @ivar registry: the private registry that L{render} exposes.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._sessions = Counter(
            "mdgateway_smtp_sessions",
            "SMTP connections accepted.",
            ["listener"],
            registry=r,
        )
        self._active = Gauge(
            "mdgateway_smtp_sessions_active",
            "SMTP connections open now.",
            ["listener"],
            registry=r,
        )
        self._tls = Counter(
            "mdgateway_smtp_tls",
            "TLS handshakes completed (STARTTLS or implicit), by version.",
            ["listener", "version"],
            registry=r,
        )
        self._tls_failures = Counter(
            "mdgateway_smtp_tls_failures",
            "TLS handshakes that failed (or TLS errors later), by listener.",
            ["listener"],
            registry=r,
        )
        self._proxy_errors = Counter(
            "mdgateway_smtp_proxy_errors",
            "Connections dropped for a missing, bad or untrusted PROXY header.",
            ["listener"],
            registry=r,
        )
        self._accepted = Counter(
            "mdgateway_smtp_messages_accepted",
            "Messages acknowledged with 250 after DATA/BDAT (spooled).",
            ["listener"],
            registry=r,
        )
        self._refused = Counter(
            "mdgateway_smtp_refused",
            "SMTP-level refusals (the refused log), by short reason.",
            ["reason"],
            registry=r,
        )
        self._rules = Counter(
            "mdgateway_rule_matches",
            "Recipients bound to a security rule.",
            ["rule", "direction"],
            registry=r,
        )
        self._scan = Histogram(
            "mdgateway_core_scan_seconds",
            "Time for MetaDefender Core to return one file's verdict.",
            ["profile", "outcome"],
            buckets=_SCAN_BUCKETS,
            registry=r,
        )
        self._core_errors = Counter(
            "mdgateway_core_errors",
            "Core failures, by error condition.",
            ["profile", "condition"],
            registry=r,
        )
        self._core_cache = Counter(
            "mdgateway_core_cache",
            "Files through a Core profile's verdict cache, by result.",
            ["profile", "result"],
            registry=r,
        )
        self._verdicts = Counter(
            "mdgateway_verdicts",
            "Message verdicts (one per processed copy).",
            ["result"],
            registry=r,
        )
        self._cdr = Counter(
            "mdgateway_cdr",
            "Deep CDR outcomes, per part.",
            ["outcome"],
            registry=r,
        )
        self._dlp = Counter(
            "mdgateway_dlp",
            "Proactive DLP outcomes, per part.",
            ["outcome"],
            registry=r,
        )
        self._deliveries = Counter(
            "mdgateway_deliveries",
            "Relay outcomes per recipient, by reply class and code.",
            ["profile", "class", "code"],
            registry=r,
        )
        self._bounces = Counter(
            "mdgateway_bounces",
            "Delivery status notifications (bounces) generated.",
            registry=r,
        )
        self._outbox_failed = Counter(
            "mdgateway_outbox_failed",
            "Records the store refused for good (kept in the outbox's failed/).",
            registry=r,
        )
        self._watched = _Watched()
        r.register(self._watched)

    # -- SMTP edge

    def session_opened(self, listener: str) -> None:
        """
        A connection was accepted on C{listener}.
        """
        self._sessions.labels(_name(listener)).inc()
        self._active.labels(_name(listener)).inc()

    def session_closed(self, listener: str) -> None:
        """
        A connection on C{listener} ended (call once per L{session_opened}).
        """
        self._active.labels(_name(listener)).dec()

    def tls_established(self, listener: str, version: str | None) -> None:
        """
        A TLS handshake completed; C{version} as OpenSSL names it
        (C{TLSv1.3}).
        """
        label = version if version in _TLS_VERSIONS else OTHER
        self._tls.labels(_name(listener), label).inc()

    def tls_failed(self, listener: str) -> None:
        """
        A TLS handshake on C{listener} failed (the log says why).
        """
        self._tls_failures.labels(_name(listener)).inc()

    def proxy_error(self, listener: str) -> None:
        """
        A PROXY protocol header was missing, malformed or from an untrusted
        address.
        """
        self._proxy_errors.labels(_name(listener)).inc()

    def message_accepted(self, listener: str) -> None:
        """
        A message was spooled and acknowledged.
        """
        self._accepted.labels(_name(listener)).inc()

    def refused(self, category: str, count: int = 1) -> str:
        """
        Count C{count} SMTP-level refusals of one category (see
        L{mdgateway.smtp.categories}); returns the label used (C{other}
        for a category outside the vocabulary).
        """
        label = category if category in REFUSAL_REASONS else OTHER
        self._refused.labels(label).inc(count)
        return label

    def rule_matched(self, rule: str | None, direction: str | None) -> None:
        """
        A recipient was bound to C{rule}.
        """
        self._rules.labels(_name(rule), _name(direction)).inc()

    # -- Core

    def core_scan(self, profile: str, seconds: float, outcome: str) -> None:
        """
        One file's scan finished after C{seconds}; C{outcome} is one of
        L{CORE_OUTCOMES}.
        """
        self._scan.labels(_name(profile), _word(outcome, CORE_OUTCOMES)).observe(
            max(0.0, seconds)
        )

    def core_error(self, profile: str, condition: object) -> None:
        """
        A Core call failed with C{condition} (a
        L{mdgateway.scan.errors.Condition} or its value).
        """
        self._core_errors.labels(
            _name(profile), _word(condition, CORE_CONDITIONS)
        ).inc()

    def core_cache(self, profile: str, result: object) -> None:
        """
        One file through a profile's verdict cache: C{hit}, C{shared} or
        C{miss}.
        """
        self._core_cache.labels(_name(profile), _word(result, CACHE_RESULTS)).inc()

    def verdict(self, result: object) -> None:
        """
        One copy got its message verdict: one of L{VERDICTS} (or a
        L{mdgateway.store.ScanVerdict}), case-insensitive.
        """
        label = _VERDICT_BY_FOLD.get(_text(result).strip().casefold(), OTHER)
        self._verdicts.labels(label).inc()

    def cdr(self, outcome: str) -> None:
        """
        One part's Deep CDR outcome, one of L{CDR_OUTCOMES}.
        """
        self._cdr.labels(_word(outcome, CDR_OUTCOMES)).inc()

    def dlp(self, outcome: str) -> None:
        """
        One part's Proactive DLP outcome, one of L{DLP_OUTCOMES}.
        """
        self._dlp.labels(_word(outcome, DLP_OUTCOMES)).inc()

    # -- Relay

    def delivery(self, profile: str, code: int | None) -> None:
        """
        One recipient's relay outcome: the reply C{code}, or C{None} when no
        reply came (connection failure, timeout).
        """
        if code is None:
            klass = label = "connection"
        elif 200 <= code <= 599:
            klass, label = f"{code // 100}xx", str(code)
        else:
            klass = label = OTHER
        self._deliveries.labels(_name(profile), klass, label).inc()

    def bounce(self) -> None:
        """
        A bounce (DSN) was generated.
        """
        self._bounces.inc()

    # -- Records owed to the store

    def outbox_failed(self, count: int = 1) -> None:
        """
        C{count} records were refused by the store for good.
        """
        self._outbox_failed.inc(count)

    def watch_outbox(
        self, depth: Callable[[], float], oldest: Callable[[], float]
    ) -> None:
        """
        C{depth()} is the number of records on disk not yet in the store,
        C{oldest()} the age in seconds of the oldest of them (0: none).
        """
        self._watched.outbox_depth = depth
        self._watched.outbox_oldest = oldest

    # -- Gauges computed at scrape time

    def watch_queue_depth(self, callback: Callable[[], float]) -> None:
        """
        C{callback()} gives the number of messages in the spool. It runs on
        every scrape, on the reactor thread: it must be cheap and must not
        block. A later call replaces the callback.
        """
        self._watched.queue_depth = callback

    def watch_queue_oldest_seconds(self, callback: Callable[[], float | None]) -> None:
        """
        C{callback()} gives the age of the oldest spooled message in
        seconds, or C{None} (shown as 0) when the spool is empty.
        """
        self._watched.queue_oldest = callback

    def watch_core_servers_up(
        self, callback: Callable[[], Mapping[str, float]]
    ) -> None:
        """
        C{callback()} maps each Core profile name to its healthy servers.
        """
        self._watched.core_up = callback

    def watch_relay_throttled(
        self, callback: Callable[[], Mapping[str, bool | float]]
    ) -> None:
        """
        C{callback()} maps each SMTP relay profile name to whether it is
        throttled now.
        """
        self._watched.throttled = callback

    def watch_relay_up(self, callback: Callable[[], Mapping[str, bool]]) -> None:
        """
        C{callback()} maps each SMTP relay profile name to whether some
        server of it answered lately.
        """
        self._watched.relay_up = callback

    def watch_store_up(self, callback: Callable[[], bool | None]) -> None:
        """
        C{callback()} says whether the store answered its last check
        (C{None} before the first: no sample).
        """
        self._watched.store_up = callback

    def watch_workers(self, callback: Callable[[], float]) -> None:
        """
        C{callback()} is the number of worker processes running now.
        """
        self._watched.workers = callback

    # -- Exposition

    #: Where the other processes' snapshots come from (set in a primary
    #: with workers, see L{mdgateway.run.supervisor}); C{None}: this process only.
    remote: Callable[[], Iterable[Snapshot]] | None = None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """
        The registry in the text format a scraper asked for with its
        C{Accept} header (OpenMetrics when asked, else Prometheus text
        0.0.4): C{(body, content_type)}. With workers, their latest
        snapshots are merged in, so one scrape shows the whole gateway.
        """
        encoder, content_type = choose_encoder(accept)
        if self.remote is None:
            return encoder(self.registry), content_type
        return encoder(_Merged(self.registry, list(self.remote()))), content_type

    def snapshot(self) -> Snapshot:
        """
        Every family of this process as JSON-able data, for a primary to
        merge into its own (see L{render}).
        """
        return [
            {
                "name": family.name,
                "help": family.documentation,
                "type": family.type,
                "unit": family.unit,
                "samples": [[s.name, s.labels, s.value] for s in family.samples],
            }
            for family in self.registry.collect()
        ]


#: One process's metric families, as L{Metrics.snapshot} makes them.
Snapshot = list[dict[str, Any]]

#: Family types whose samples only ever grow while a process lives.
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})


class RetiredCounters:
    """
    The last counter values of worker processes that are gone, kept by
    the primary so the merged totals never go down when a worker dies
    and its successor counts from zero (Prometheus would read a drop as
    a counter reset and every rate would be wrong). Gauges of a dead
    worker are not kept: they described a process that is no more.
    """

    def __init__(self) -> None:
        self._families: dict[str, dict[str, Any]] = {}

    def add(self, snapshot: Snapshot) -> None:
        """
        Fold in the last snapshot of a worker that ended.
        """
        for family in snapshot:
            if not isinstance(family, dict) or family.get("type") not in _CUMULATIVE:
                continue
            name = family.get("name")
            if not isinstance(name, str):
                continue
            kept = self._families.setdefault(
                name,
                {
                    "name": name,
                    "help": family.get("help", ""),
                    "type": family["type"],
                    "unit": family.get("unit", ""),
                    "samples": {},
                },
            )
            samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = kept[
                "samples"
            ]
            for item in family.get("samples", []):
                try:
                    sample, labels, value = item
                    key = (str(sample), tuple(sorted(labels.items())))
                    number = float(value)
                except (TypeError, ValueError, AttributeError):
                    continue
                if key[0].endswith("_created"):
                    samples[key] = min(samples.get(key, number), number)
                else:
                    samples[key] = samples.get(key, 0.0) + number

    def snapshot(self) -> Snapshot:
        """
        What was kept, in the form of L{Metrics.snapshot} (empty when no
        worker has ended).
        """
        return [
            {
                **{k: v for k, v in family.items() if k != "samples"},
                "samples": [
                    [sample, dict(labels), value]
                    for (sample, labels), value in family["samples"].items()
                ],
            }
            for family in self._families.values()
        ]


#: Gauges whose whole-gateway value is not the sum over processes.
_COMBINE: Mapping[str, Callable[[list[float]], float]] = {
    "mdgateway_queue_oldest_seconds": max,
    "mdgateway_outbox_oldest_seconds": max,
    "mdgateway_relay_throttled": max,
    "mdgateway_core_servers_up": min,
    "mdgateway_relay_up": min,
    "mdgateway_store_up": min,
}


class _Merged:
    """
    A registry's families with other processes' snapshots folded in:
    counters, histograms and most gauges add up, a few gauges take the
    maximum or minimum (L{_COMBINE}), C{_created} times the earliest.
    """

    def __init__(self, registry: CollectorRegistry, snapshots: list[Snapshot]):
        self._registry = registry
        self._others: dict[str, list[dict[str, Any]]] = {}
        for snapshot in snapshots:
            for family in snapshot:
                if isinstance(family, dict) and isinstance(family.get("name"), str):
                    self._others.setdefault(family["name"], []).append(family)

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            values: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values.setdefault(key, []).append(sample.value)
            for other in self._others.get(family.name, []):
                for item in other.get("samples", []):
                    try:
                        name, labels, value = item
                        key = (str(name), tuple(sorted(labels.items())))
                        values.setdefault(key, []).append(float(value))
                    except (TypeError, ValueError, AttributeError):
                        continue
            combine = _COMBINE.get(family.name, sum)
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, labels), found in values.items():
                pick = min if name.endswith("_created") else combine
                merged.add_sample(name, dict(labels), pick(found))
            yield merged
