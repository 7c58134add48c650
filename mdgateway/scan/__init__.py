# -*- test-case-name: tests.test_core_runtime -*-
"""
MetaDefender Core: the REST client, the result model, the profile runtime
and an emulator of the Core v4 API.
"""

from mdgateway.scan.client import CoreClient, build_http_client
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import ICoreServerClient
from mdgateway.scan.runtime import CoreRuntime, ServerStatus
from mdgateway.scan.verdict import Outcome, Verdict, parse_verdict

__all__ = [
    "Condition",
    "CoreClient",
    "CoreError",
    "CoreRuntime",
    "ICoreServerClient",
    "Outcome",
    "ServerStatus",
    "Verdict",
    "build_http_client",
    "parse_verdict",
]
