# -*- test-case-name: tests.test_testing -*-
"""
The seam between the queue and delivery: what the queue manager asks of a
rule's SMTP relay server profile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Interface

from mdgateway.policy.profiles import SmtpProfile

if TYPE_CHECKING:
    from mdgateway.relay.delivery import Outgoing, RecipientOutcome


class IRelay(Interface):
    """
    Delivers prepared messages through relay profiles, keeping each
    profile's connections, failover order and throttling.
    L{mdgateway.relay.delivery.Relay} is the real one;
    L{mdgateway.testing.relay.FakeRelay} records and answers as told.
    """

    async def deliver(
        profile: SmtpProfile, outgoing: Outgoing
    ) -> list[RecipientOutcome]:
        """
        Hand one L{mdgateway.relay.delivery.Outgoing} to the profile's
        servers; one L{mdgateway.relay.delivery.RecipientOutcome} per
        recipient, in order. Never raises for a delivery failure: those
        are outcomes.
        """

    def throttled_until(profile: SmtpProfile) -> float:
        """
        Until when the profile's servers asked us to slow down (0: they
        did not).
        """

    def healthy(profile: SmtpProfile, window: float = 60.0) -> bool:
        """
        Whether some server of the profile answered within C{window}
        seconds (or none was tried yet).
        """

    def reconfigure(helo: str) -> None:
        """
        Greet with C{helo} from now on (a reload); idle connections made
        with the old name are closed.
        """

    async def close() -> None:
        """
        Close every connection (the gateway stopping).
        """
