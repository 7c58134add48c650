"""
twistd/twist plugins: C{mdgateway} (the gateway) and C{mdcore-emulator}.
"""

from twisted.application.service import ServiceMaker

mdgateway = ServiceMaker(
    "mdgateway",
    "mdgateway.run.tap",
    "SMTP security gateway scanning mail with MetaDefender Core",
    "mdgateway",
)

mdcore_emulator = ServiceMaker(
    "mdcore-emulator",
    "mdgateway.emulator.tap",
    "Emulator of the MetaDefender Core v4 REST API for tests and trials",
    "mdcore-emulator",
)
