# -*- test-case-name: tests.test_processing -*-
"""
One message copy between the 250 and the relay: decompose, scan every part
with the rule's Core profile, act on the verdicts, rebuild what changed and
stamp the product's headers.

The result is a L{CopyOutcome}: what to deliver (as new header bytes in
front of a file, so an unchanged message is never copied), what to keep in
quarantine, and what to record. Everything that reads or writes message
files runs in a worker thread, so a 25 MB message never stalls the reactor.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.message.decompose import Decomposition, ScannablePart, decompose
from mdgateway.message.digest import ContentHasher, content_digest
from mdgateway.message.errors import RebuildError
from mdgateway.message.headers import (
    format_fields,
    has_fields,
    rewrite_headers,
)
from mdgateway.message.marker import MARKER_HEADER, MarkerCheck
from mdgateway.message.rebuild import NewFile, Notice, rebuild_file
from mdgateway.policy.rules import Rule
from mdgateway.queue.blocking import BlockingWork
from mdgateway.queue.copies import (
    CopyJob,
    CopyOutcome,
    Decision,
    Delivery,
    ICopyProcessor,
    PartReport,
)
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import IScanner
from mdgateway.scan.verdict import Outcome, Verdict

log = Logger()

#: Header names the gateway writes; every field so named arriving from
#: outside is removed, wherever it stands in the header block, before ours
#: are stamped, so none can be forged.
OWN_HEADERS = ("X-Metadefender-*", "X-MD-*")

#: How the rule's error handling names each Core condition.
_CONDITION_KEYS = {
    Condition.UNREACHABLE: "core_unreachable",
    Condition.BUSY: "core_busy",
    Condition.SCAN_TIMEOUT: "scan_timeout",
    Condition.PROCESSING_FAILED: "processing_failed",
    Condition.NOT_SCANNED: "not_scanned",
}
MODIFICATION_FAILURE = "modification_failure"
#: The result of a copy relayed without a scan (made here, or processed
#: here before).
SKIPPED = "Skipped/AlreadyProcessed"
#: The result of a zero-byte part in the history's part list.
EMPTY = "Empty"
#: Which error action wins when parts failed with different conditions: a
#: bypass for one part must never deliver a part the rule retries or fails.
_SEVERITY = {"bypass": 0, "retry": 1, "fail": 2}


@attrs.frozen
class _Scanned:
    part: ScannablePart
    verdict: Verdict | None
    error: CoreError | None
    #: A zero-byte part: never sent to Core (which refuses empty files),
    #: clean since nothing in it can do harm.
    empty: bool = False


@implementer(ICopyProcessor)
class CopyProcessor:
    """
    Processes message copies with the Core runtime of each rule's profile.

    @param scanner_for: the scanner for a Core profile name.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        scanner_for: Callable[[str], IScanner],
        hostname: str,
        metrics: Any = None,
    ) -> None:
        self.reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self.threadpool = threadpool
        self._blocking = BlockingWork(self._threads, threadpool)
        self.scanner_for = scanner_for
        self.hostname = hostname
        self.metrics = metrics

    async def _thread(
        self, job: CopyJob, function: Callable[..., Any], *args: Any
    ) -> Any:
        """
        File work for C{job}'s message: in place for a small one (none of
        it syncs to disk), else in the pool.
        """
        return await self._blocking.run(job.size, function, *args)

    async def process(self, job: CopyJob) -> CopyOutcome:
        rule = job.rule
        decomposition: Decomposition = await self._thread(
            job, decompose, job.message_path, os.path.join(job.workdir, "parts")
        )
        scanner = self.scanner_for(rule.core_profile.name)
        scanned = await self._scan_all(
            scanner, decomposition.parts, rule.core_profile.name
        )
        if decomposition.reading_error is not None:
            # Another reader's view of this message could not be taken: what
            # it would show cannot be called scanned.
            whole = decomposition.parts[0]
            scanned.append(
                _Scanned(
                    whole,
                    None,
                    CoreError(
                        Condition.NOT_SCANNED,
                        f"ambiguous structure ({decomposition.detail}); "
                        f"{decomposition.reading_error}",
                    ),
                )
            )
        reports = [self._report(s) for s in scanned]
        used = next(
            (s.verdict.core_url for s in scanned if s.verdict is not None), None
        )
        job = attrs.evolve(job, core_url=used)
        blocked = [s for s in scanned if s.verdict is not None and s.verdict.blocked]
        errors = [s for s in scanned if s.error is not None]
        bypassed: str | None = None
        if errors and not (blocked and rule.blocked_action == "block"):
            worst = max(
                errors,
                key=lambda s: _SEVERITY[
                    self._error_action(rule, self._condition(s.error))
                ],
            )
            condition = self._condition(worst.error)
            action = self._error_action(rule, condition)
            if action != "bypass":
                detail = f"{worst.part.filename}: {worst.error}"
                return CopyOutcome(
                    Decision.RETRY if action == "retry" else Decision.FAIL,
                    f"Failed/{condition}",
                    parts=tuple(reports),
                    condition=condition,
                    detail=detail,
                )
            bypassed = condition
        signed_untouchable = decomposition.signed and not rule.modify_smime
        if blocked:
            return await self._blocked(job, decomposition, scanned, reports, blocked)
        replacements: dict[str, NewFile | Notice] = {}
        actions: list[str] = []
        if rule.apply_sanitized and not signed_untouchable and not bypassed:
            try:
                await self._sanitized(
                    scanner, job, decomposition, scanned, replacements, actions
                )
            except (CoreError, OSError, ValueError) as e:
                return await self._modification_failed(job, reports, str(e))
        result = f"Bypassed/{bypassed}" if bypassed else "Allowed"
        sanitized = bool(replacements)
        try:
            main = await self._build(
                job, decomposition, replacements, result, sanitized
            )
        except (RebuildError, OSError) as e:
            return await self._modification_failed(job, reports, str(e))
        deliveries = [main]
        quarantine = None
        if sanitized and rule.quarantine_sanitized:
            if rule.external_quarantine:
                deliveries.append(await self._original_copy(job, result))
            else:
                quarantine = "sanitized"
        reports = [
            attrs.evolve(r, action="sanitized") if r.part_id in replacements else r
            for r in reports
        ]
        if bypassed:
            actions.append(f"scan bypassed ({bypassed})")
            log.warn(
                "message copy {security_id} delivered unscanned: {condition}",
                security_id=job.security_id,
                condition=bypassed,
                rule=rule.name,
            )
        return CopyOutcome(
            Decision.DELIVER,
            result,
            tuple(deliveries),
            sanitized=sanitized,
            parts=tuple(reports),
            actions=tuple(actions),
            quarantine=quarantine,
            condition=bypassed,
        )

    async def generated(self, job: CopyJob) -> CopyOutcome:
        """
        A message the gateway made itself (a bounce, a released original):
        relayed unscanned and unchanged but for a marker, which never lets
        it pass unscanned should it come back.
        """
        digest = await self._thread(job, content_digest, job.message_path)
        prefix = format_fields([job.marker_field(digest, "Generated")])
        return CopyOutcome(
            Decision.DELIVER,
            SKIPPED,
            (Delivery(job.message_path, prefix),),
            actions=("made by this gateway: relayed unscanned",),
        )

    async def relay_once(self, job: CopyJob, check: MarkerCheck) -> CopyOutcome:
        """
        Relay a message this cluster processed before, under a rule at
        least as strict as the job's (see
        L{mdgateway.message.marker.MarkerCount.relay_once}), without a
        second scan: its content unchanged, every product field
        it arrived with removed, and ours stamped anew: the marker it came
        with (so that a further return is a loop), a new one, and the
        result and sanitized flag that marker vouches for.
        """
        stamp = check.stamp
        assert stamp is not None
        fields = self.stamp(job, stamp.result, stamp.sanitized)
        delivery = await self._thread(job, _write_relayed, job, check, fields)
        return CopyOutcome(
            Decision.DELIVER,
            SKIPPED,
            (delivery,),
            sanitized=stamp.sanitized,
            actions=(
                f"already processed by this gateway as {check.message_id} "
                f"({stamp.result}, rule {stamp.rule}): relayed unscanned",
            ),
        )

    # -- scanning ----------------------------------------------------------

    async def _scan_all(
        self, scanner: Any, parts: Sequence[ScannablePart], profile: str
    ) -> list[_Scanned]:
        async def one(part: ScannablePart) -> _Scanned:
            if part.size == 0:
                return _Scanned(part, None, None, empty=True)
            started = self.reactor.seconds()
            try:
                verdict = await scanner.scan(str(part.path), part.filename)
            except CoreError as e:
                if self.metrics is not None:
                    self.metrics.core_scan(
                        profile, self.reactor.seconds() - started, "error"
                    )
                    self.metrics.core_error(profile, e.condition.value)
                return _Scanned(part, None, e)
            if self.metrics is not None:
                outcome = (
                    "blocked"
                    if verdict.blocked
                    else "sanitized"
                    if verdict.sanitized
                    else "allowed"
                )
                self.metrics.core_scan(
                    profile, self.reactor.seconds() - started, outcome
                )
            if verdict.outcome is Outcome.OTHER:
                # A final result we do not know is not a pass: fail closed
                # through the rule's "not scanned" handling.
                error = CoreError(
                    Condition.NOT_SCANNED,
                    f"unknown result {verdict.result!r}",
                    verdict=verdict,
                )
                return _Scanned(part, None, error)
            return _Scanned(part, verdict, None)

        results: list[_Scanned] = await gatherResults(
            [Deferred.fromCoroutine(one(part)) for part in parts],
            consumeErrors=True,
        )
        return results

    def _condition(self, error: CoreError | None) -> str:
        assert error is not None
        if error.condition is Condition.ACCESS_DENIED:
            return "access_denied"
        return _CONDITION_KEYS[error.condition]

    def _error_action(self, rule: Rule, condition: str) -> str:
        # A wrong API key is a configuration error: always fail closed and
        # retry, whatever the rule says about unreachable servers.
        if condition == "access_denied":
            return "retry"
        return rule.on_error.action_for(condition)

    def _report(self, scanned: _Scanned) -> PartReport:
        part, verdict = scanned.part, scanned.verdict
        base = PartReport(
            part_id=part.part_id,
            filename=part.filename,
            content_type=part.content_type,
            size=part.size,
            result="Error" if verdict is None else verdict.result,
        )
        if scanned.empty:
            return attrs.evolve(base, result=EMPTY, action="empty")
        if verdict is None:
            return attrs.evolve(base, error=str(scanned.error), action="error")
        return attrs.evolve(
            base,
            blocked_reason=verdict.blocked_reason,
            sanitized=verdict.sanitized,
            data_id=verdict.data_id,
            core_url=verdict.core_url,
            dlp_hits=len(verdict.dlp.hits) if verdict.dlp is not None else 0,
            action="blocked" if verdict.blocked else "allowed",
            cache=verdict.cache,
        )

    # -- acting --------------------------------------------------------------

    async def _sanitized(
        self,
        scanner: Any,
        job: CopyJob,
        decomposition: Decomposition,
        scanned: list[_Scanned],
        replacements: dict[str, NewFile | Notice],
        actions: list[str],
    ) -> None:
        if decomposition.unreliable:
            return
        for item in scanned:
            verdict = item.verdict
            if verdict is None or not verdict.has_converted_file:
                continue
            if not item.part.replaceable:
                # Preamble or epilogue text: it cannot be swapped for Core's
                # converted file; it is delivered as scanned (not blocked).
                actions.append(
                    f"not sanitized: {item.part.filename} cannot be replaced"
                )
                continue
            part = item.part
            dest = os.path.join(job.workdir, f"sanitized-{part.part_id}")
            name = await scanner.download_sanitized(verdict, dest)
            name = name or verdict.converted_name or part.filename
            content_type = mimetypes.guess_type(name)[0] or part.content_type
            replacements[part.part_id] = NewFile(
                dest,
                content_type,
                name if part.named or part.kind.value == "attachment" else None,
                charset=part.charset if content_type.startswith("text/") else None,
            )
            actions.append(f"sanitized part {part.part_id} ({part.filename} -> {name})")

    async def _blocked(
        self,
        job: CopyJob,
        decomposition: Decomposition,
        scanned: list[_Scanned],
        reports: list[PartReport],
        blocked: list[_Scanned],
    ) -> CopyOutcome:
        rule = job.rule
        assert blocked[0].verdict is not None
        reason = blocked[0].verdict.blocked_reason or blocked[0].verdict.result
        result = f"Blocked/{reason}"
        quarantine = "blocked" if rule.quarantine_blocked else None
        action = rule.blocked_action
        if action == "strip" and (
            decomposition.unreliable
            or any(not item.part.replaceable for item in blocked)
        ):
            # The blocked content is not a part of ours that can be taken
            # out (the message could not be taken apart; it lies in a
            # preamble or epilogue, or in another reader's reading): it can
            # only go with the whole message.
            action = "block"
        if action == "block":
            reports = [
                attrs.evolve(r, action="blocked")
                if r.result not in ("Error", EMPTY)
                else r
                for r in reports
            ]
            deliveries: list[Delivery] = []
            if rule.external_quarantine and rule.quarantine_blocked:
                deliveries.append(await self._original_copy(job, result))
                quarantine = None
            if rule.notify_recipient:
                deliveries.append(await self._notification(job, reason))
            return CopyOutcome(
                Decision.BLOCK,
                result,
                tuple(deliveries),
                parts=tuple(reports),
                actions=("blocked",),
                quarantine=quarantine,
            )
        replacements: dict[str, NewFile | Notice] = {}
        actions = []
        if action == "strip":
            for item in blocked:
                assert item.verdict is not None
                part = item.part
                why = item.verdict.blocked_reason or item.verdict.result
                replacements[part.part_id] = Notice(
                    f"The attachment {part.filename!r} was removed by the mail "
                    f"gateway: {why}.\r\n",
                    filename=f"{part.filename}.removed.txt" if part.named else None,
                )
                actions.append(f"stripped part {part.part_id} ({part.filename})")
        if rule.apply_sanitized and not (
            decomposition.signed and not rule.modify_smime
        ):
            scanner = self.scanner_for(rule.core_profile.name)
            clean = [s for s in scanned if s.part.part_id not in replacements]
            try:
                await self._sanitized(
                    scanner, job, decomposition, clean, replacements, actions
                )
            except (CoreError, OSError, ValueError) as e:
                bypass = rule.on_error.action_for(MODIFICATION_FAILURE) == "bypass"
                if action != "strip" or not bypass:
                    return await self._modification_failed(job, reports, str(e))
                # Bypass Deep CDR only: the blocked parts are still stripped.
                replacements = {
                    p: r for p, r in replacements.items() if isinstance(r, Notice)
                }
                actions = [a for a in actions if a.startswith("stripped ")]
        sanitized = any(isinstance(r, NewFile) for r in replacements.values())
        try:
            main = await self._build(
                job, decomposition, replacements, result, sanitized
            )
        except (RebuildError, OSError) as e:
            if action == "strip":
                # The blocked content cannot be taken out: it goes, with the
                # whole message, never through.
                log.error(
                    "message copy {security_id}: cannot strip ({error}); blocked",
                    security_id=job.security_id,
                    error=str(e),
                )
                return CopyOutcome(
                    Decision.BLOCK,
                    result,
                    parts=tuple(reports),
                    actions=("blocked: the blocked content could not be stripped",),
                    quarantine="blocked",
                )
            return await self._modification_failed(job, reports, str(e))
        stripped = {p for p, r in replacements.items() if isinstance(r, Notice)}
        reports = [
            attrs.evolve(
                r,
                action="stripped"
                if r.part_id in stripped
                else "sanitized"
                if r.part_id in replacements
                else ("delivered" if r.action == "blocked" else r.action),
            )
            for r in reports
        ]
        deliveries = [main]
        if quarantine is not None and rule.external_quarantine:
            deliveries.append(await self._original_copy(job, result))
            quarantine = None
        return CopyOutcome(
            Decision.DELIVER,
            result,
            tuple(deliveries),
            sanitized=sanitized,
            parts=tuple(reports),
            actions=tuple(actions) or ("delivered blocked content",),
            quarantine=quarantine,
        )

    async def _modification_failed(
        self, job: CopyJob, reports: list[PartReport], detail: str
    ) -> CopyOutcome:
        action = job.rule.on_error.action_for(MODIFICATION_FAILURE)
        log.error(
            "message copy {security_id}: could not rebuild the message: {detail}",
            security_id=job.security_id,
            detail=detail,
        )
        if action == "bypass":
            # Deliver the original as received, and say so.
            result = f"Bypassed/{MODIFICATION_FAILURE}"
            original = await self._thread(
                job,
                _write_delivery,
                job,
                None,
                {},
                self.stamp(job, result, False),
                None,
                result,
                False,
            )
            return CopyOutcome(
                Decision.DELIVER,
                result,
                (original,),
                parts=tuple(reports),
                actions=("modification bypassed",),
                condition=MODIFICATION_FAILURE,
                detail=detail,
            )
        return CopyOutcome(
            Decision.RETRY if action == "retry" else Decision.FAIL,
            f"Failed/{MODIFICATION_FAILURE}",
            parts=tuple(reports),
            condition=MODIFICATION_FAILURE,
            detail=detail,
        )

    # -- building messages ---------------------------------------------------

    def stamp(
        self,
        job: CopyJob,
        result: str,
        sanitized: bool,
        extra: Sequence[tuple[str, str]] = (),
    ) -> list[tuple[str, str]]:
        """
        The product's headers for a processed copy, in order; the marker
        goes in front of them once the delivered body is known.
        """
        rule = job.rule
        profile = rule.core_profile
        url = job.core_url or (profile.servers[0].url if profile.servers else "")
        fields = [
            ("X-Metadefender-Core-Url", url),
            ("X-Metadefender-Core-Result", result),
            ("X-Metadefender-Core-Rule", profile.rule),
            (
                "X-Metadefender-EmailSecurity-Sanitized",
                "True" if sanitized else "False",
            ),
            *extra,
            *rule.custom_headers,
        ]
        return fields

    async def _build(
        self,
        job: CopyJob,
        decomposition: Decomposition,
        replacements: dict[str, NewFile | Notice],
        result: str,
        sanitized: bool,
    ) -> Delivery:
        rule = job.rule
        fields = self.stamp(job, result, sanitized)
        tag = None
        if result.startswith("Blocked/") and rule.subject_tag_blocked:
            tag = rule.subject_tag_blocked
        elif sanitized and rule.subject_tag_sanitized:
            tag = rule.subject_tag_sanitized
        delivery: Delivery = await self._thread(
            job,
            _write_delivery,
            job,
            decomposition,
            replacements,
            fields,
            tag,
            result,
            sanitized,
        )
        return delivery

    async def _original_copy(self, job: CopyJob, result: str) -> Delivery:
        fields = self.stamp(
            job,
            result,
            False,
            [
                ("X-Metadefender-EmailSecurity-OriginalCopy", "True"),
                ("X-Metadefender-To-Quarantine", "True"),
            ],
        )
        # Never to be relayed unscanned should it come back: its stamp's
        # result is not one of a scanned copy.
        delivery: Delivery = await self._thread(
            job,
            _write_delivery,
            job,
            None,
            {},
            fields,
            None,
            f"OriginalCopy/{result}",
        )
        return attrs.evolve(delivery, kind="original copy")

    async def _notification(self, job: CopyJob, reason: str) -> Delivery:
        path = os.path.join(job.workdir, "notification.eml")
        await self._thread(job, _write_notification, path, job, reason, self.hostname)
        return Delivery(path, kind="notification")


def _has_own_headers(path: str) -> bool:
    """
    Whether the top-level header block, read to its end however large,
    carries any field named like one we stamp.
    """
    with open(path, "rb") as f:
        return has_fields(f, OWN_HEADERS)


def _write_delivery(
    job: CopyJob,
    decomposition: Decomposition | None,
    replacements: dict[str, NewFile | Notice],
    fields: list[tuple[str, str]],
    subject_tag: str | None,
    result: str,
    sanitized: bool = False,
) -> Delivery:
    """
    Produce the message to relay, copying as little as possible: an
    unchanged message is the original file with our headers in front.
    """
    source = job.message_path
    if replacements:
        assert decomposition is not None
        rebuilt = os.path.join(job.workdir, "rebuilt.eml")
        rebuild_file(source, decomposition.structure, replacements, rebuilt)
        source = rebuilt
    marker = job.marker_field(content_digest(source), result, sanitized)
    prefix = format_fields([marker, *fields])
    if subject_tag is None and not _has_own_headers(source):
        return Delivery(source, prefix, 0)
    final = os.path.join(job.workdir, f"final-{len(os.listdir(job.workdir))}.eml")
    with open(source, "rb") as src, open(final, "wb") as out:
        rewrite_headers(
            src, out, prepend=prefix, remove=OWN_HEADERS, subject_tag=subject_tag
        )
    return Delivery(final, b"", 0)


def _write_relayed(
    job: CopyJob, check: MarkerCheck, fields: list[tuple[str, str]]
) -> Delivery:
    """
    The relayed-once message: our fields, then the spooled file without
    any product field it arrived with.
    """
    assert check.stamp is not None
    digest = content_digest(job.message_path)
    marker = job.marker_field(digest, SKIPPED, check.stamp.sanitized)
    prefix = format_fields([marker, (MARKER_HEADER, check.value), *fields])
    final = os.path.join(job.workdir, "relayed.eml")
    with open(job.message_path, "rb") as src, open(final, "wb") as out:
        rewrite_headers(src, out, prepend=prefix, remove=OWN_HEADERS)
    return Delivery(final)


def _write_notification(path: str, job: CopyJob, reason: str, hostname: str) -> None:
    import email.utils

    fields = [
        ("From", f"Mail Gateway <postmaster@{hostname}>"),
        ("To", ", ".join(job.recipients)),
        ("Subject", "A message to you was blocked"),
        ("Date", email.utils.formatdate()),
        ("Message-ID", email.utils.make_msgid(domain=hostname)),
        ("Auto-Submitted", "auto-generated"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "8bit"),
    ]
    body = (
        f"A message from {job.sender or 'the mail system'} to you was blocked "
        f"by the mail gateway.\r\n\r\nReason: {reason}\r\n"
        f"Reference: {job.security_id}\r\n\r\n"
        "Ask your administrator if you need the message released.\r\n"
    ).encode()
    data = format_fields(fields) + b"\r\n" + body
    hasher = ContentHasher()
    hasher.feed(data)
    marker = format_fields([job.marker_field(hasher.digest(), "Notification")])
    with open(path, "wb") as f:
        f.write(marker + data)
