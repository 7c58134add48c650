# -*- test-case-name: tests.test_spool -*-
"""
The envelope of a spooled message (sender, recipients, parameters, the rule chosen
at RCPT) and its JSON form on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: The envelope format this code writes; it reads this and older ones.
ENVELOPE_VERSION = 1


class EnvelopeFormatError(ValueError):
    """
    Envelope JSON that this version cannot read.
    """


def _str_params(value: Mapping[str, str | None]) -> dict[str, str | None]:
    return dict(value)


@attrs.frozen
class Recipient:
    """
    One accepted RCPT TO.

    @ivar address: the forward-path, UTF-8 allowed (SMTPUTF8).
    @ivar parameters: RCPT parameters as received, e.g. C{NOTIFY}, C{ORCPT};
        a keyword without value maps to C{None}. Treat as read-only.
    @ivar rule: name of the security rule chosen at RCPT time.
    @ivar direction: the rule's direction (e.g. C{inbound}, C{outbound}).
    """

    address: str
    parameters: dict[str, str | None] = attrs.field(factory=dict, converter=_str_params)
    rule: str | None = None
    direction: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """
        This recipient as a JSON-ready dict.
        """
        return {
            "address": self.address,
            "parameters": dict(self.parameters),
            "rule": self.rule,
            "direction": self.direction,
        }

    @classmethod
    def from_dict(cls, data: object) -> Recipient:
        """
        Read what L{to_dict} wrote.

        @raise EnvelopeFormatError: when a field has the wrong type.
        """
        obj = _object(data, "recipient")
        return cls(
            address=_get_str(obj, "address", "recipient"),
            parameters=_get_params(obj, "parameters", "recipient"),
            rule=_get_opt_str(obj, "rule", "recipient"),
            direction=_get_opt_str(obj, "direction", "recipient"),
        )


def _recipients(value: Iterable[Recipient]) -> tuple[Recipient, ...]:
    return tuple(value)


@attrs.frozen
class Envelope:
    """
    Everything about a message except its bytes, as the SMTP session saw it.

    Written once at commit and never changed; delivery progress goes to the
    entry's state file instead, so the envelope cannot be half rewritten.

    @ivar queue_id: the spool id; L{SpoolWriter.commit} fills it in when empty.
    @ivar received_at: when the message arrived, seconds since the epoch from
        the injected clock.
    @ivar sender: the reverse-path; C{""} for the null reverse-path C{<>}.
    @ivar mail_parameters: MAIL FROM parameters (C{SIZE}, C{BODY},
        C{SMTPUTF8}, C{RET}, C{ENVID}, C{AUTH}); keyword without value is
        C{None}. Treat as read-only.
    @ivar recipients: the accepted recipients, in RCPT order.
    @ivar client_address: the client's IP address (after PROXY, if any).
    @ivar client_port: the client's port.
    @ivar client_helo: the EHLO/HELO argument.
    @ivar tls: whether the transaction ran over TLS.
    @ivar tls_version: e.g. C{TLSv1.3}.
    @ivar tls_cipher: the negotiated cipher name.
    @ivar authenticated_user: the authenticated user, if AUTH succeeded.
    @ivar protocol: C{SMTP}, C{ESMTP}, C{ESMTPS}, C{ESMTPA} or C{ESMTPSA}
        (RFC 3848), as in the Received header.
    @ivar listener: name of the listener that took the message.
    @ivar config_version: version of the configuration in force.
    @ivar extra: a JSON object for later additions without a format change.
    @ivar version: the envelope format version, L{ENVELOPE_VERSION}.
    """

    queue_id: str
    received_at: float
    sender: str
    recipients: tuple[Recipient, ...] = attrs.field(converter=_recipients)
    mail_parameters: dict[str, str | None] = attrs.field(
        factory=dict, converter=_str_params
    )
    client_address: str | None = None
    client_port: int | None = None
    client_helo: str | None = None
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    authenticated_user: str | None = None
    protocol: str = "ESMTP"
    listener: str = ""
    config_version: str = ""
    extra: dict[str, Any] = attrs.field(factory=dict)
    version: int = ENVELOPE_VERSION

    def to_json(self) -> str:
        """
        The envelope as a JSON text (not ASCII-escaped; encode as UTF-8).

        @raise ValueError: for values JSON cannot carry (NaN, lone surrogates
            are caught when encoding).
        """
        return json.dumps(
            {
                "version": self.version,
                "queue_id": self.queue_id,
                "received_at": self.received_at,
                "sender": self.sender,
                "mail_parameters": dict(self.mail_parameters),
                "recipients": [r.to_dict() for r in self.recipients],
                "client_address": self.client_address,
                "client_port": self.client_port,
                "client_helo": self.client_helo,
                "tls": self.tls,
                "tls_version": self.tls_version,
                "tls_cipher": self.tls_cipher,
                "authenticated_user": self.authenticated_user,
                "protocol": self.protocol,
                "listener": self.listener,
                "config_version": self.config_version,
                "extra": self.extra,
            },
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        """
        Read what L{to_json} wrote (bytes are decoded as UTF-8).

        Unknown keys are ignored so that a later minor addition does not
        strand mail; a newer format version is refused.

        @raise EnvelopeFormatError: when the text is not an envelope this
            version can read.
        """
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            data = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise EnvelopeFormatError(f"envelope is not JSON: {e}") from e
        obj = _object(data, "envelope")
        version = obj.get("version")
        if type(version) is not int or not 1 <= version <= ENVELOPE_VERSION:
            raise EnvelopeFormatError(f"unsupported envelope version {version!r}")
        received_at = obj.get("received_at")
        if not isinstance(received_at, int | float) or isinstance(received_at, bool):
            raise EnvelopeFormatError("envelope: received_at must be a number")
        recipients = obj.get("recipients")
        if not isinstance(recipients, list):
            raise EnvelopeFormatError("envelope: recipients must be a list")
        port = obj.get("client_port")
        if port is not None and type(port) is not int:
            raise EnvelopeFormatError("envelope: client_port must be an integer")
        tls = obj.get("tls", False)
        if type(tls) is not bool:
            raise EnvelopeFormatError("envelope: tls must be true or false")
        extra = obj.get("extra", {})
        if not isinstance(extra, dict):
            raise EnvelopeFormatError("envelope: extra must be an object")
        return cls(
            version=version,
            queue_id=_get_str(obj, "queue_id", "envelope"),
            received_at=float(received_at),
            sender=_get_str(obj, "sender", "envelope"),
            mail_parameters=_get_params(obj, "mail_parameters", "envelope"),
            recipients=tuple(Recipient.from_dict(r) for r in recipients),
            client_address=_get_opt_str(obj, "client_address", "envelope"),
            client_port=port,
            client_helo=_get_opt_str(obj, "client_helo", "envelope"),
            tls=tls,
            tls_version=_get_opt_str(obj, "tls_version", "envelope"),
            tls_cipher=_get_opt_str(obj, "tls_cipher", "envelope"),
            authenticated_user=_get_opt_str(obj, "authenticated_user", "envelope"),
            protocol=_get_str(obj, "protocol", "envelope", "ESMTP"),
            listener=_get_str(obj, "listener", "envelope", ""),
            config_version=_get_str(obj, "config_version", "envelope", ""),
            extra=extra,
        )


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise EnvelopeFormatError(f"{what} must be a JSON object")
    return data


def _get_str(
    obj: dict[str, Any], key: str, what: str, default: str | None = None
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise EnvelopeFormatError(f"{what}: {key} must be a string")
    return value


def _get_opt_str(obj: dict[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise EnvelopeFormatError(f"{what}: {key} must be a string or null")
    return value


def _get_params(obj: dict[str, Any], key: str, what: str) -> dict[str, str | None]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or not all(
        v is None or isinstance(v, str) for v in value.values()
    ):
        raise EnvelopeFormatError(f"{what}: {key} must map names to strings")
    return value
