"""
mdgateway: an SMTP security gateway that scans mail with MetaDefender Core.
"""

__version__ = "2026.11.0"
