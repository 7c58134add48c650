# -*- test-case-name: tests.test_message_rebuild -*-
"""
The errors the message library raises on purpose.

Parsing and decomposing never raise for bad input (they report an unreliable
structure instead); these errors are for callers that ask for something
impossible, such as rebuilding a part that does not exist.  I/O failures
surface as the usual L{OSError}.
"""

from __future__ import annotations


class MessageError(ValueError):
    """
    Base of every error raised by L{mdgateway.message}.
    """


class CharsetError(MessageError):
    """
    A MIME charset name that Python cannot decode text with.

    @ivar charset: the name as it appeared in the message.
    """

    def __init__(self, charset: str) -> None:
        super().__init__(f"unknown charset {charset!r}")
        self.charset = charset


class HeaderNameError(MessageError):
    """
    A header field name that is not RFC 5322 C{ftext} (printable ASCII other
    than colon and space).

    @ivar name: the offending name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"invalid header name {name!r}: use printable ASCII without "
            "spaces or colons"
        )
        self.name = name


class RebuildError(MessageError):
    """
    A rebuild request that cannot be honoured: the structure is unreliable or
    does not match the file, or a replacement names an unknown part, overlaps
    another one or has an invalid content type.
    """
