# -*- test-case-name: tests.test_core_client -*-
"""
The client of one MetaDefender Core v4 (or v5) server.

Uploads stream from disk with a Content-Length (never chunked). A file
costs one request where Core has the synchronous submit (C{POST /file/sync},
4.21+): it answers with the complete result, or with 408 and a C{data_id}
to poll when its sync timeout passes. Older servers get C{POST /file} and
polls on C{process_info.progress_percentage} (not C{scan_results}, which
reaches 100 before Deep CDR and DLP finish). The profile's C{submit}
chooses, C{auto} from the version each server reports (asked once, and
again after the server could not be reached). Converted files stream to
disk, and every failure becomes a L{CoreError} with a L{Condition}.
Response bodies are read under their own timeout, because the request's
stops at the headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import treq
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import (  # type: ignore[attr-defined]  # public, no __all__
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.errors import (
    Condition,
    CoreError,
    error_for_response,
    parse_retry_after,
)
from mdgateway.scan.http import CoreHttp, build_http_client
from mdgateway.scan.interfaces import ICoreServerClient
from mdgateway.scan.upload import FileUpload
from mdgateway.scan.verdict import (
    DocumentState,
    MalformedResultError,
    Verdict,
    document_state,
    failure_condition,
    filename_from_disposition,
    is_not_found,
    parse_verdict,
)
from mdgateway.scan.versions import has_sync, reported_version

__all__ = ["NETWORK_ERRORS", "CoreClient", "build_http_client", "sha256_file"]

_log = Logger()
_T = TypeVar("_T")

#: Exceptions that mean "no usable answer from the server".
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
    ConnectTimeoutError,
    CancelledError,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestNotSent,
    ResponseFailed,
)

_UPLOAD_BLOCK = 1 << 16
#: Seconds to wait for Core to acknowledge cancelling a timed-out scan.
_CANCEL_TIMEOUT = 5.0
_DATA_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Answers to C{POST /file/sync} from a server that does not have it: no
#: such resource, or (the path read as C{/file/{data_id}}) no such method.
_NO_SYNC_STATUSES = (404, 405)


def sha256_file(path: str) -> str:
    """
    The SHA-256 of a file, read in blocks (run it in a thread).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _TappedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    Remembers the protocol the body is delivered to, so a body read that
    times out can close the connection instead of leaving it stalled.
    """

    protocol: IProtocol | None = None

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self.original.deliverBody(protocol)

    def abort(self) -> None:
        transport = getattr(self.protocol, "transport", None)
        if transport is not None:
            transport.stopProducing()


class _NoSyncError(Exception):
    """
    The server has no C{POST /file/sync}: submit the old way.
    """


@implementer(ICoreServerClient)
class CoreClient:
    """
    Scans files on one Core server.

    @param http: the HTTP layer (see L{build_http_client}).
    @param clock: used for poll sleeps and body timeouts.
    @param cooperator: schedules upload reads (default: the global one).
    @param request_timeout: seconds until response headers (includes the
        upload; a synchronous submission waits until the scan's deadline).
    @param body_timeout: seconds to read a response body.
    @param max_resubmissions: new uploads after Core lost a C{data_id}.
    @param poll_backoff: factor applied to the poll interval after each poll.
    @param max_poll_interval: cap of the poll interval.
    @param hasher: computes a file's SHA-256 off the reactor thread.
    """

    def __init__(
        self,
        server: CoreServer,
        profile: CoreProfile,
        http: CoreHttp,
        clock: IReactorTime,
        *,
        cooperator: Cooperator | None = None,
        request_timeout: float = 60.0,
        body_timeout: float = 60.0,
        max_resubmissions: int = 2,
        poll_backoff: float = 1.5,
        max_poll_interval: float = 5.0,
        max_json_size: int = 16 << 20,
        hasher: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self.server = server
        self._profile = profile
        self._http = http
        self._clock = clock
        self._cooperator: Any = cooperator or task
        self._request_timeout = request_timeout
        self._body_timeout = body_timeout
        self._max_resubmissions = max_resubmissions
        self._poll_backoff = poll_backoff
        self._max_poll_interval = max_poll_interval
        self._max_json_size = max_json_size
        # Without a hasher of the caller's (a thread pool of its own), the
        # digest is computed in place: fine for tests and small files.
        self._hasher = hasher or (lambda p: succeed(sha256_file(p)))
        self._base = server.url.rstrip("/").encode("ascii")
        # The headers of every request, encoded once.
        self._headers = Headers({b"user_agent": [profile.user_agent.encode("utf-8")]})
        if server.apikey:
            self._headers.setRawHeaders(b"apikey", [server.apikey.encode("utf-8")])
        # Synchronous submission: None until the server's version is known
        # (submit "auto"); the profile's choice otherwise.
        self._sync_default: bool | None = (
            None if profile.submit == "auto" else profile.submit == "sync"
        )
        self._sync = self._sync_default
        self._learning: list[Deferred[None]] | None = None
        #: What the server's C{GET /version} last reported.
        self.core_version: str | None = None

    # -- ICoreServerClient -------------------------------------------------------

    async def scan(self, path: str, filename: str) -> Verdict:
        """
        Hash lookup (if the profile asks for it), submit (synchronously
        where the server can), poll until complete if the answer was not,
        parse; resubmit (a bounded number of times) when Core forgets the
        C{data_id}.

        @raise CoreError: with the condition the failure maps to.
        """
        if self._profile.hash_lookup:
            cached = await self.lookup(path)
            if cached is not None:
                return cached
        deadline = self._clock.seconds() + self._profile.scan_timeout
        for attempt in range(self._max_resubmissions + 1):
            doc = await self._submit_and_wait(path, filename, deadline)
            if doc is None:
                _log.warn(
                    "Core {server} lost a result; resubmitting",
                    server=self.server.url,
                    attempt=attempt + 1,
                )
                continue
            verdict = self._parse(doc)
            condition = failure_condition(verdict)
            if condition is not None:
                raise CoreError(
                    condition,
                    f"result {verdict.scan_all_result_a or verdict.scan_all_result_i}"
                    f" for {verdict.data_id}",
                    server=self.server.url,
                    verdict=verdict,
                )
            return verdict
        raise CoreError(
            Condition.UNREACHABLE,
            f"result not found after {self._max_resubmissions + 1} submissions",
            server=self.server.url,
            server_fault=True,
        )

    async def download_converted(self, verdict: Verdict, dest_path: str) -> str:
        """
        Stream C{GET /file/converted/{data_id}} into C{dest_path}.

        @return: the converted file's name: from C{Content-Disposition}, else
            C{converted_destination}, else the DLP output name, else the
            original name.
        @raise CoreError: I{processing failed} when Core has no converted
            file (404); the mapped condition otherwise. A partial file is
            removed.
        """
        self._check_id(verdict.data_id)
        response = await self._send(
            b"GET", f"/file/converted/{verdict.data_id}", what="download"
        )
        if response.code != 200:
            body = await self._read_small(response, "download")
            if response.code == 404:
                raise CoreError(
                    Condition.PROCESSING_FAILED,
                    f"no converted file for {verdict.data_id}",
                    server=self.server.url,
                    status=404,
                    verdict=verdict,
                )
            raise self._failure(response.code, body, "download")
        header = response.headers.getRawHeaders(b"content-disposition", [None])[-1]
        name = filename_from_disposition(
            header.decode("latin-1") if header is not None else None
        )
        dlp_name = verdict.dlp.filename if verdict.dlp is not None else ""
        name = (
            name
            or verdict.converted_name
            or dlp_name
            or verdict.display_name
            or verdict.data_id
        )
        try:
            with open(dest_path, "wb") as f:

                def write(data: bytes) -> None:
                    f.write(data)

                await self._read_body(response, write, "download")
        except BaseException:
            try:
                os.unlink(dest_path)
            except OSError:
                pass
            raise
        return name

    async def probe(self) -> None:
        """
        C{GET /version}; raises unless Core answers 200. Learns the version
        (and with it the submit mode), so a server that comes back after
        an outage is asked afresh.
        """
        response = await self._send(b"GET", "/version", what="health probe")
        body = await self._read_small(response, "health probe")
        if response.code != 200:
            raise self._failure(response.code, body, "health probe")
        self._learn_version(reported_version(body))

    @property
    def synchronous(self) -> bool | None:
        """
        Whether files go to C{POST /file/sync} (C{None}: not known yet).
        """
        return self._sync

    # -- the steps -------------------------------------------------------------

    async def _submit_and_wait(
        self, path: str, filename: str, deadline: float
    ) -> Mapping[str, Any] | None:
        """
        The complete document of one submission (synchronous where the
        server has it), or C{None} when Core lost it.
        """
        if await self._sync_supported():
            try:
                return await self.submit_sync(path, filename, deadline)
            except _NoSyncError:
                pass
        data_id = await self.submit(path, filename)
        return await self.wait(data_id, deadline)

    def _upload_headers(self, filename: str) -> dict[bytes, bytes]:
        headers = {
            b"filename": quote(filename, safe="").encode("ascii"),
            b"content-type": b"application/octet-stream",
        }
        if self._profile.rule != "Automatic":
            headers[b"rule"] = quote(self._profile.rule, safe="").encode("ascii")
        return headers

    async def submit(self, path: str, filename: str) -> str:
        """
        C{POST /file} streaming C{path}; return the C{data_id}.
        """
        upload = FileUpload(path, self._cooperator, _UPLOAD_BLOCK)
        try:
            response = await self._send(
                b"POST",
                "/file",
                headers=self._upload_headers(filename),
                data=upload,
                what="upload",
            )
        finally:
            # Core may answer before it has the whole body (a 503, say):
            # the rest is not sent, and the upload closes its file.
            upload.stopProducing()
        body = await self._read_small(response, "upload")
        if response.code != 200:
            raise self._failure(response.code, body, "upload", response)
        return self._data_id(body, "upload")

    async def submit_sync(
        self, path: str, filename: str, deadline: float
    ) -> Mapping[str, Any] | None:
        """
        C{POST /file/sync} streaming C{path}: the complete document Core
        answers with, or, after Core's 408 (its sync timeout passed), the
        document polled by the C{data_id} it gave; C{None} when Core lost
        it.

        The answer is awaited until C{deadline}: a scan still running then
        is I{scan timeout} (Core answers 408 at its own sync timeout, so
        a server that says nothing that long is counted against its
        health too).

        @raise _NoSyncError: the server has no C{POST /file/sync} (404 or
            405); it is not tried there again until the server was
            unreachable.
        """
        what = "synchronous upload"
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            raise self._scan_timeout("before its upload")
        upload = FileUpload(path, self._cooperator, _UPLOAD_BLOCK)
        try:
            response = await self._send(
                b"POST",
                "/file/sync",
                headers=self._upload_headers(filename),
                data=upload,
                what=what,
                timeout=remaining,
                late=lambda: self._scan_timeout("waiting for the synchronous answer"),
            )
        finally:
            upload.stopProducing()
        body = await self._read_small(response, what)
        if response.code == 408:
            return await self.wait(self._data_id(body, what), deadline)
        if response.code != 200:
            error = self._failure(response.code, body, what, response)
            if (
                response.code in _NO_SYNC_STATUSES
                and error.condition is not Condition.ACCESS_DENIED
            ):
                self._no_sync(response.code)
                raise _NoSyncError()
            raise error
        doc = self._decode(body, what)
        if is_not_found(doc):
            return None
        try:
            state = document_state(doc)
        except MalformedResultError as e:
            raise self._malformed(str(e)) from e
        if state is DocumentState.COMPLETE:
            complete: Mapping[str, Any] = doc
            return complete
        # Not what Core sends, but an unfinished result can still be polled.
        data_id = doc["data_id"]
        self._check_id(data_id)
        return await self.wait(data_id, deadline)

    async def fetch(self, data_id: str) -> Mapping[str, Any] | None:
        """
        C{GET /file/{data_id}}: the document, or C{None} when Core does not
        know the id (404, or 200 with C{{"<id>": "Not Found"}}).
        """
        self._check_id(data_id)
        response = await self._send(b"GET", f"/file/{data_id}", what="poll")
        body = await self._read_small(response, "poll")
        if response.code == 404:
            return None
        if response.code != 200:
            raise self._failure(response.code, body, "poll")
        doc = self._decode(body, "poll")
        if is_not_found(doc):
            return None
        if not isinstance(doc, Mapping):
            raise self._malformed("poll answer is not an object")
        return doc

    async def wait(self, data_id: str, deadline: float) -> Mapping[str, Any] | None:
        """
        Poll until the document is complete, sleeping C{poll_interval} and
        backing off; C{None} if Core forgot the id.

        @raise CoreError: I{scan timeout} past C{deadline} (after asking Core
            to cancel the scan).
        """
        interval = self._profile.poll_interval
        while True:
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                cancelling = Deferred.fromCoroutine(self.cancel(data_id))
                cancelling.addTimeout(_CANCEL_TIMEOUT, self._clock)
                try:
                    await cancelling
                except Exception:
                    pass  # best effort; the timeout is what the caller needs
                raise CoreError(
                    Condition.SCAN_TIMEOUT,
                    f"{data_id} not complete after {self._profile.scan_timeout:g}s",
                    server=self.server.url,
                )
            await task.deferLater(self._clock, min(interval, remaining), _nothing)
            doc = await self.fetch(data_id)
            if doc is None:
                return None
            try:
                state = document_state(doc)
            except MalformedResultError as e:
                raise self._malformed(str(e)) from e
            if state is DocumentState.COMPLETE:
                return doc
            interval = min(
                interval * self._poll_backoff,
                max(self._max_poll_interval, self._profile.poll_interval),
            )

    async def cancel(self, data_id: str) -> None:
        """
        Ask Core to stop processing C{data_id}; errors are only logged.
        """
        try:
            response = await self._send(
                b"POST", f"/file/{data_id}/cancel", what="cancel"
            )
            await self._read_small(response, "cancel")
        except CoreError as e:
            _log.info(
                "Core {server} did not cancel {data_id}: {error}",
                server=self.server.url,
                data_id=data_id,
                error=str(e),
            )

    async def lookup(self, path: str) -> Verdict | None:
        """
        C{GET /hash/{sha256}}: a usable earlier verdict, or C{None}.

        Usable means complete, not failed, from the profile's rule (unless
        C{Automatic}) and, when it had a converted file, that file is still
        there. Network failures and C{Access denied} raise; any other answer
        just means "scan it".
        """
        digest = await self._hasher(path)
        response = await self._send(b"GET", f"/hash/{digest}", what="hash lookup")
        body = await self._read_small(response, "hash lookup")
        if response.code != 200:
            error = self._failure(response.code, body, "hash lookup")
            if error.condition is Condition.ACCESS_DENIED:
                raise error
            return None  # the upload will show whether the server works
        try:
            doc = json.loads(body)
            if document_state(doc) is not DocumentState.COMPLETE:
                return None
            verdict = parse_verdict(doc, self.server.url, from_cache=True)
        except (ValueError, MalformedResultError):
            return None
        rule = self._profile.rule
        if failure_condition(verdict) is not None:
            return None
        if rule != "Automatic" and verdict.rule and verdict.rule != rule:
            return None
        dlp = verdict.dlp
        converted = verdict.sanitized or (dlp is not None and dlp.redacted)
        if converted and not verdict.has_converted_file:
            return None
        return verdict

    # -- the submit mode -------------------------------------------------------

    async def _sync_supported(self) -> bool:
        """
        Whether to submit with C{POST /file/sync}. With C{submit = "auto"}
        the first scan asks the server's version while the scans starting
        meanwhile wait for the answer (if it does not come, they poll).
        """
        if self._sync is None:
            if self._learning is not None:
                waiting: Deferred[None] = Deferred()
                self._learning.append(waiting)
                await waiting
            else:
                self._learning = []
                try:
                    await self._ask_version()
                finally:
                    # Each waiter runs on to its next request in turn (a
                    # chain of lock hand-overs would nest them all).
                    waiters, self._learning = self._learning, None
                    for waiting in waiters:
                        waiting.callback(None)
        return bool(self._sync)

    async def _ask_version(self) -> None:
        what = "version probe"
        response = await self._send(b"GET", "/version", what=what)
        body = await self._read_small(response, what)
        if response.code == 200:
            self._learn_version(reported_version(body))
            return
        error = self._failure(response.code, body, what)
        if error.condition is Condition.ACCESS_DENIED or response.code >= 500:
            raise error  # the server is not working (or refuses us) now
        # No version to go by (a proxy hiding it, say): what every Core has.
        _log.info(
            "Core {server} did not tell its version (HTTP {status}); polling",
            server=self.server.url,
            status=response.code,
        )
        self._sync = False

    def _learn_version(self, version: str | None) -> None:
        self.core_version = version
        if self._sync_default is not None:
            if self._sync is None:
                self._sync = self._sync_default
            return
        sync = has_sync(version)
        if self._sync is not sync:
            _log.info(
                "Core {server} is version {version}: files are submitted "
                + ("with POST /file/sync" if sync else "with POST /file and polled"),
                server=self.server.url,
                version=version or "unknown",
            )
        self._sync = sync

    def _no_sync(self, status: int) -> None:
        _log.warn(
            "Core {server} has no POST /file/sync (HTTP {status}); polling instead",
            server=self.server.url,
            status=status,
            version=self.core_version,
        )
        self._sync = False

    def _forget_version(self) -> None:
        """
        The server could not be reached: it may come back as another
        version, so ask again (with C{submit = "sync"}, try it again).
        """
        self._sync = self._sync_default

    # -- HTTP plumbing -----------------------------------------------------------

    async def _send(
        self,
        method: bytes,
        path: str,
        *,
        what: str,
        headers: dict[bytes, bytes] | None = None,
        data: Any = None,
        timeout: float | None = None,
        late: Callable[[], CoreError] | None = None,
    ) -> IResponse:
        """
        One request with the profile's headers, its answer's headers
        awaited for C{timeout} (default: the request timeout). Core never
        redirects, and a redirect is not followed (it would send the API
        key wherever it pointed): it is an answer like any other.

        @param late: the error for a timeout (default: I{unreachable}).
        """
        all_headers = self._headers.copy()
        if headers:
            for name, value in headers.items():
                all_headers.setRawHeaders(name, [value])
        request = self._http.request(
            method, self._base + path.encode("ascii"), all_headers, data
        )
        response: IResponse = await self._bounded(
            request,
            self._request_timeout if timeout is None else timeout,
            what,
            "no answer",
            late=late,
        )
        return response

    async def _read_body(
        self, response: IResponse, sink: Callable[[bytes], None], what: str
    ) -> None:
        tapped = _TappedResponse(response)
        reading = treq.collect(tapped, sink)
        await self._bounded(
            reading,
            self._body_timeout,
            what,
            "response body not received",
            tapped.abort,
        )

    async def _bounded(
        self,
        waiting: Deferred[_T],
        timeout: float,
        what: str,
        missing: str,
        abort: Callable[[], None] | None = None,
        late: Callable[[], CoreError] | None = None,
    ) -> _T:
        """
        Await C{waiting} for at most C{timeout} seconds (on the injected
        clock), mapping network failures and the timeout to I{unreachable}
        (or the timeout to C{late()}, when given).

        A cancellation by our caller (shutdown, say) stays a
        L{CancelledError}, so it is never mistaken for a failing server.
        C{abort} closes the connection when the wait ends badly, so a
        stalled body does not keep its socket.
        """
        cancelled_by_caller = timed_out = False

        def cancel(_: Deferred[_T]) -> None:
            nonlocal cancelled_by_caller
            cancelled_by_caller = True
            waiting.cancel()

        def on_timeout(result: object, _: float) -> object:
            # The cancelled request may fail with ResponseNeverReceived
            # rather than CancelledError: remember it was the clock.
            nonlocal timed_out
            timed_out = True
            return result

        guarded: Deferred[_T] = Deferred(cancel)
        waiting.addTimeout(timeout, self._clock, onTimeoutCancel=on_timeout)
        waiting.chainDeferred(guarded)
        try:
            return await guarded
        except Exception as e:
            if abort is not None:
                abort()
            if cancelled_by_caller:
                raise CancelledError() from e
            if isinstance(e, CoreError):
                raise
            if timed_out:
                if late is not None:
                    raise late() from e
                self._forget_version()
                raise CoreError(
                    Condition.UNREACHABLE,
                    f"{what}: {missing} within {timeout:g}s",
                    server=self.server.url,
                    server_fault=True,
                ) from e
            if isinstance(e, NETWORK_ERRORS):
                self._forget_version()
                raise self._unreachable(what, e) from e
            raise

    async def _read_small(self, response: IResponse, what: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = self._max_json_size

        def sink(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise self._malformed(f"answer larger than {limit} bytes")
            chunks.append(data)

        await self._read_body(response, sink, what)
        return b"".join(chunks)

    def _data_id(self, body: bytes, what: str) -> str:
        doc = self._decode(body, what)
        data_id = doc.get("data_id") if isinstance(doc, Mapping) else None
        if not isinstance(data_id, str):
            raise self._malformed(f"{what} answer has no data_id")
        self._check_id(data_id)
        return data_id

    def _scan_timeout(self, when: str) -> CoreError:
        return CoreError(
            Condition.SCAN_TIMEOUT,
            f"not complete after {self._profile.scan_timeout:g}s ({when})",
            server=self.server.url,
        )

    def _decode(self, body: bytes, what: str) -> Any:
        try:
            return json.loads(body)
        except ValueError as e:
            raise self._malformed(f"{what} answer is not JSON") from e

    def _parse(self, doc: Mapping[str, Any]) -> Verdict:
        try:
            return parse_verdict(doc, self.server.url)
        except MalformedResultError as e:
            raise self._malformed(str(e)) from e

    def _check_id(self, data_id: str) -> None:
        if not _DATA_ID.fullmatch(data_id):
            raise self._malformed(f"unusable data_id {data_id[:40]!r}")

    def _malformed(self, message: str) -> CoreError:
        return CoreError(
            Condition.UNREACHABLE,
            message,
            server=self.server.url,
            server_fault=True,
        )

    def _unreachable(self, what: str, error: BaseException) -> CoreError:
        reasons = getattr(error, "reasons", None)
        if reasons and isinstance(reasons[0], Failure) and reasons[0].value:
            error = reasons[0].value
        detail = f"{type(error).__name__}: {error}"
        return CoreError(
            Condition.UNREACHABLE,
            f"{what}: {detail}",
            server=self.server.url,
            server_fault=True,
        )

    def _failure(
        self,
        status: int,
        body: bytes,
        what: str,
        response: IResponse | None = None,
    ) -> CoreError:
        retry_after = None
        if response is not None:
            header = response.headers.getRawHeaders(b"retry-after", [None])[-1]
            retry_after = parse_retry_after(
                header.decode("latin-1") if header is not None else None,
                self._clock.seconds(),
            )
        error = error_for_response(
            status, body, server=self.server.url, what=what, retry_after=retry_after
        )
        if error.condition is Condition.ACCESS_DENIED:
            _log.error(
                "MetaDefender Core {server} denied access ({what}, HTTP {status}):"
                " check the server's API key and that rule {rule!r} is allowed"
                " for user agent {user_agent!r}",
                server=self.server.url,
                what=what,
                status=status,
                rule=self._profile.rule,
                user_agent=self._profile.user_agent,
            )
        return error


def _nothing() -> None:
    return None
