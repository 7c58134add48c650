"""
A Core emulator on loopback with a profile and a runtime over it: the rig
of the Core client's and the verdict cache's tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.runtime import CoreRuntime


class CoreRig:
    """
    An emulator on loopback, a profile named C{name} for it (C{profile}:
    its other settings; results polled every 10 ms unless given) and a
    runtime over it.
    """

    def __init__(
        self,
        tmp_path: Path,
        config: EmulatorConfig | None = None,
        *,
        name: str = "t",
        on_cache: Callable[[str, str], None] | None = None,
        **profile: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.server = EmulatorServer(reactor, CoreEmulator(reactor, config))
        self.server.start()
        self.emulator = self.server.emulator
        profile.setdefault("poll_interval", 0.01)
        self.profile = CoreProfile(
            name=name, servers=(CoreServer(self.server.url),), **profile
        )
        self.runtime = CoreRuntime.from_profile(
            self.profile, reactor, on_cache=on_cache
        )

    def file(self, name: str, data: bytes) -> str:
        """
        A file of C{data} to scan.
        """
        path = self.tmp_path / name
        path.write_bytes(data)
        return str(path)

    async def close(self) -> None:
        await self.runtime.close()
        await self.server.close()
