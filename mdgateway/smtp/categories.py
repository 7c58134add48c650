# -*- test-case-name: tests.test_metrics -*-
"""
Why a reply refused: a short category for every negative SMTP reply.

The refused log and the C{mdgateway_smtp_refused_total} counter name each
refusal by a category from one bounded vocabulary (L{REFUSAL_CATEGORIES}),
so a dashboard can tell syntax errors from policy refusals from a full
spool, and the counter keeps a handful of series whatever the reply texts
say.

A reply says its category itself when whoever made it knows best
(C{Reply.of(550, "5.7.1", "...", category="tenant")}); otherwise it is
worked out from the enhanced status code and the text (L{RULES}). To add a
category, add its name to L{REFUSAL_CATEGORIES} (and, if replies will not
carry it explicitly, a rule to L{RULES}).
"""

from __future__ import annotations

from mdgateway.smtp.replies import Reply

#: Every category a refusal can have.
REFUSAL_CATEGORIES = frozenset(
    {
        # policy: who may send what to whom
        "no_rule",
        "no_policy",
        "relay_denied",
        "tenant",
        "policy",
        "loop",
        # the client's conduct
        "syntax",
        "bad_sequence",
        "too_big",
        "too_many_recipients",
        "too_many_connections",
        "too_many_errors",
        "line_too_long",
        "smuggling",
        "smtputf8_required",
        "timeout",
        "tls_required",
        "auth_required",
        "auth_failed",
        # the gateway's own state
        "shutting_down",
        "not_ready",
        "scanner_busy",
        "spool_full",
        "queue_full",
        "outbox_full",
        "local_error",
        # anything else, by class
        "other_4xx",
        "other_5xx",
    }
)

# (enhanced status code or prefix ending in ".", or None; lower-case text
# fragment or None; category), tried in order; the first whose given parts
# all match wins. The texts are those of mdgateway's own replies
# (mdgateway.smtp.replies, receive.admission, receive.handler), so a
# reworded reply still falls back on its enhanced code.
RULES: tuple[tuple[str | None, str | None, str], ...] = (
    (None, "no security rule", "no_rule"),
    (None, "no policy for recipient", "no_policy"),
    (None, "relaying denied", "relay_denied"),
    (None, "tenant", "tenant"),
    (None, "mail loop", "loop"),
    (None, "too many hops", "loop"),
    (None, "bare cr or lf", "smuggling"),
    (None, "line exceeds", "line_too_long"),
    (None, "line too long", "line_too_long"),
    (None, "too many long lines", "line_too_long"),
    (None, "mail queue full", "queue_full"),
    (None, "unable to record mail", "outbox_full"),
    (None, "too many recipients", "too_many_recipients"),
    (None, "too many connections", "too_many_connections"),
    (None, "too many errors", "too_many_errors"),
    (None, "starttls", "tls_required"),
    (None, "authentication required", "auth_required"),
    (None, "shutting down", "shutting_down"),
    (None, "service starting", "not_ready"),
    (None, "scanning service unavailable", "scanner_busy"),
    ("5.3.4", None, "too_big"),
    ("5.2.3", None, "too_big"),
    ("4.3.1", None, "spool_full"),
    ("5.4.6", None, "loop"),
    ("5.6.11", None, "smuggling"),
    ("4.4.2", None, "timeout"),
    ("5.7.8", None, "auth_failed"),
    ("5.7.0", "authentication", "auth_failed"),
    ("5.7.11", None, "tls_required"),
    ("5.6.7", None, "smtputf8_required"),
    ("5.1.7", None, "syntax"),
    ("5.1.3", None, "syntax"),
    ("5.5.1", None, "bad_sequence"),
    ("5.5.2", None, "syntax"),
    ("5.5.4", None, "syntax"),
    ("4.3.0", None, "local_error"),
    ("5.7.", None, "policy"),
)


def _status_matches(pattern: str, status: str | None) -> bool:
    if status is None:
        return False
    if pattern.endswith("."):
        return status.startswith(pattern)
    return status == pattern


def categorize(code: int, enhanced: str | None, text: str) -> str:
    """
    The category of a refusal reply from its parts (L{RULES}), or
    C{other_4xx}/C{other_5xx} by its code.

    @param code: the reply code sent, e.g. C{550}.
    @param enhanced: its enhanced status code, e.g. C{5.7.1}, if any.
    @param text: the reply text.
    """
    folded = text.casefold()
    for status, fragment, category in RULES:
        if status is not None and not _status_matches(status, enhanced):
            continue
        if fragment is not None and fragment not in folded:
            continue
        return category
    return "other_4xx" if 400 <= code < 500 else "other_5xx"


def refusal_category(reply: Reply) -> str:
    """
    The category of C{reply}: the one it carries when that is in the
    vocabulary, else the one L{categorize} works out.
    """
    if reply.category in REFUSAL_CATEGORIES:
        return reply.category
    return categorize(reply.code, reply.status or None, reply.text)


__all__ = ["REFUSAL_CATEGORIES", "RULES", "categorize", "refusal_category"]
