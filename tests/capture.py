"""
Log events captured into a list, as a typed L{ILogObserver}.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer


@implementer(ILogObserver)
class ListObserver:
    """
    Appends every event to C{events} (a list the test reads).
    """

    def __init__(self, events: list[LogEvent] | None = None) -> None:
        self.events: list[LogEvent] = [] if events is None else events

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
