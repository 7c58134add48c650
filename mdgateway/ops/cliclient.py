# -*- test-case-name: tests.test_cli -*-
"""
The C{mdgateway} command's side of the admin API: a blocking HTTP client
(a command-line tool is not the reactor), its errors and exit statuses.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4


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
                    "no token: the admin API needs one (--token-file, "
                    "$MDGATEWAY_ADMIN_TOKEN_FILE or $MDGATEWAY_ADMIN_TOKEN, or "
                    "[admin] token_file in the configuration --config names)",
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


def quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")
