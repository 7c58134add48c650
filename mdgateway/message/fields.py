# -*- test-case-name: tests.test_message_headers -*-
"""
Header field values: MIME parameters (RFC 2045, RFC 2231) and encoded words
(RFC 2047), read and written.

Reading is done twice over in spirit: strictly for the structure parser,
which must know when it cannot be sure what a mail client will see (an
unknown charset raises L{CharsetError}), and leniently for display.  Writing
produces forms that common mail clients read back, and that the stdlib
C{email} parser decodes to the same text.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from urllib.parse import quote, unquote_to_bytes

from mdgateway.message.errors import CharsetError

#: RFC 5322 C{ftext}: the characters of a header field name.
FTEXT = re.compile(r"[!-9;-~]+")

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_PARAMETER_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[^;"]+|;', re.DOTALL)
_COMMENT = re.compile(r"\([^()]*\)")
_SECTION = re.compile(r"[0-9]{1,4}")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9!#$%&+.^_`{|}~-]+")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)

#: Bytes that may appear as themselves in a Q encoded word in any position.
_Q_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"
)
#: Characters that may appear unescaped in an RFC 2231 extended value.
_ATTRIBUTE_SAFE = "!#$&+-.^_`|~"
#: Length of C{=?utf-8?b?} plus C{?=}.
_WORD_OVERHEAD = 12
#: RFC 2047's limit on the length of one encoded word.
MAX_WORD = 75


def decode_bytes(data: bytes, charset: str, *, strict: bool = False) -> str:
    """
    Decode text in a MIME charset.

    @param strict: raise L{CharsetError} for a charset Python has no text
        codec for, instead of falling back to UTF-8 with replacement.
    """
    name = charset.split("*", 1)[0].strip().strip('"').lower() or "utf-8"
    try:
        # Decoding nothing never looks the codec up, so probe it first.
        b"x".decode(name, "replace")
        return data.decode(name, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        if strict:
            raise CharsetError(charset) from None
        return data.decode("utf-8", "replace")


def _decode_word(encoding: str, text: str) -> bytes | None:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    if encoding in "bB":
        raw += b"=" * (-len(raw) % 4)
        try:
            return binascii.a2b_base64(raw)
        except binascii.Error:
            return None
    return binascii.a2b_qp(raw, header=True)


def decode_words(value: str, *, strict: bool = False) -> str:
    """
    Decode the RFC 2047 encoded words in an (unfolded) header value.

    Whitespace between two adjacent encoded words is dropped, as the RFC
    says; an encoded word that cannot be decoded is kept literally.

    @param strict: see L{decode_bytes}.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        if not (after_word and _WHITESPACE.fullmatch(between)):
            out.append(between)
        charset, encoding, text = match.groups()
        raw = _decode_word(encoding, text)
        if raw is None:
            out.append(match.group(0))
            after_word = False
        else:
            out.append(decode_bytes(raw, charset, strict=strict))
            after_word = True
        pos = match.end()
    out.append(value[pos:])
    return "".join(out)


def _q_cost(data: bytes) -> int:
    return sum(1 if byte in _Q_SAFE or byte == 0x20 else 3 for byte in data)


def _q_encode(data: bytes) -> str:
    return "".join(
        "_" if byte == 0x20 else chr(byte) if byte in _Q_SAFE else f"={byte:02X}"
        for byte in data
    )


def encode_words(text: str, first: int = MAX_WORD, rest: int = MAX_WORD) -> list[str]:
    """
    Encode text as UTF-8 RFC 2047 encoded words, each a whole number of
    characters, using Q or B, whichever is shorter overall.

    @param first: the longest the first word may be (at least 24, so that
        any one character fits).
    @param rest: the longest every later word may be (at most 75).
    @return: the words, to be separated by folding whitespace.
    """
    data = text.encode("utf-8", "replace")
    use_q = _q_cost(data) <= 4 * -(-len(data) // 3)
    words: list[str] = []
    current = bytearray()
    cost = 0
    budget = max(first, 24) - _WORD_OVERHEAD

    def flush() -> None:
        if use_q:
            words.append(f"=?utf-8?q?{_q_encode(bytes(current))}?=")
        else:
            encoded = binascii.b2a_base64(bytes(current), newline=False)
            words.append(f"=?utf-8?b?{encoded.decode('ascii')}?=")

    for char in text:
        piece = char.encode("utf-8", "replace")
        if use_q:
            grown = cost + _q_cost(piece)
        else:
            grown = 4 * -(-(len(current) + len(piece)) // 3)
        if grown > budget and current:
            flush()
            current.clear()
            budget = min(rest, MAX_WORD) - _WORD_OVERHEAD
            grown = _q_cost(piece) if use_q else 4 * -(-len(piece) // 3)
        current += piece
        cost = grown
    if current or not words:
        flush()
    return words


def needs_encoding(value: str) -> bool:
    """
    Whether a header value must be written as encoded words: it has
    non-ASCII or control characters (which includes CR and LF, so a value
    can never inject a header line), or text that a reader would take for an
    encoded word.
    """
    return (
        any(not (" " <= char <= "~") and char != "\t" for char in value)
        or "=?" in value
    )


def split_parameters(value: str) -> tuple[str, list[tuple[str, str]]]:
    """
    Split a MIME header value into its main value and C{(name, value)}
    parameters, in order, names lowercased and values unquoted.

    Parameter sections and charsets (RFC 2231) are left for
    L{get_parameter}; comments are removed from unquoted text.
    """
    segments: list[list[str]] = [[]]
    for token in _PARAMETER_TOKENS.findall(value):
        if token == ";":
            segments.append([])
        else:
            segments[-1].append(token)
    main = _COMMENT.sub("", "".join(segments[0])).strip()
    parameters: list[tuple[str, str]] = []
    for tokens in segments[1:]:
        name, equals, raw = "".join(tokens).partition("=")
        if not equals:
            continue
        raw = raw.strip()
        if raw.startswith('"'):
            inner = raw[1:-1] if raw.endswith('"') and len(raw) > 1 else raw[1:]
            text = _QUOTED_PAIR.sub(r"\1", inner)
        else:
            text = _COMMENT.sub("", raw).strip()
        parameters.append((name.strip().lower(), text))
    return main, parameters


def _raw_parameters(value: str) -> list[tuple[str, str]]:
    """
    The C{(name, raw text)} of each parameter, the text as written (quotes,
    escapes, comments and folds kept).
    """
    segments: list[list[str]] = [[]]
    for token in _PARAMETER_TOKENS.findall(value):
        if token == ";":
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for tokens in segments[1:]:
        name, equals, raw = "".join(tokens).partition("=")
        if equals:
            found.append((name.strip(" \t\r\n").lower(), raw.strip(" \t\r\n")))
    return found


def boundary_problem(value: str) -> str | None:
    """
    Why readers may disagree on the C{boundary} of a C{Content-Type} value
    (as written, folds kept), or L{None} when they will not.

    Readers differ on everything but a plain form: Python's email alone
    reads backslashes, a trailing space, a fold or an RFC 2231 form one way
    under C{compat32} and another under C{policy.default}, and some clients
    strip comments where others keep them.  So a boundary given more than
    once, in RFC 2231 form, with a backslash, folded, with space at either
    end, with text after its closing quote, or unquoted but not a plain
    token (letters, digits and C{!#$%&+-.^_`{|}~}) is called ambiguous.
    """
    found = [
        (name, raw)
        for name, raw in _raw_parameters(value)
        if name == "boundary" or name.startswith("boundary*")
    ]
    if not found:
        return None
    if len(found) > 1:
        return "more than one boundary parameter"
    name, raw = found[0]
    if name != "boundary":
        return "a boundary in RFC 2231 form"
    if "\\" in raw:
        return "a backslash in its boundary"
    if "\r\n" in raw:
        return "a folded boundary"
    if raw.startswith('"'):
        inner = raw[1:-1]
        if len(raw) < 2 or not raw.endswith('"') or '"' in inner:
            return "text after the quoted boundary, or no closing quote"
    else:
        inner = raw
        if not _PLAIN_TOKEN.fullmatch(inner):
            # Some readers (Python's policy.default) end an unquoted value
            # at the first RFC 2045 tspecial ("=", "/", "?" ...), others
            # take all of it: ambiguous unless quoted.
            return "an unquoted boundary that is not a plain token"
    if inner != inner.strip(" \t"):
        return "space at an end of its boundary"
    return None


def duplicate_parameter(parameters: Sequence[tuple[str, str]]) -> str | None:
    """
    The first parameter name that appears twice, if any: readers disagree on
    which one wins, so the structure parser treats it as ambiguous.
    """
    seen: set[str] = set()
    for name, _ in parameters:
        if name in seen:
            return name
        seen.add(name)
    return None


def get_parameter(
    parameters: Sequence[tuple[str, str]],
    name: str,
    *,
    strict: bool = False,
    words: bool = True,
) -> str | None:
    """
    The value of parameter C{name}, following RFC 2231 (sections
    C{name*0}, C{name*1*}, ... and C{charset'language'} prefixes) and then
    RFC 2047 (encoded words inside a plain quoted value, which many clients
    write and every client reads).

    An RFC 2231 form wins over the plain one, as in current mail clients.

    @param strict: see L{decode_bytes}.
    @param words: decode encoded words in a plain value; L{False} for values
        that are protocol tokens, such as C{boundary} and C{charset}.
    """
    plain: str | None = None
    sections: dict[int, tuple[bool, str]] = {}
    for key, value in parameters:
        if key == name:
            plain = value
        elif key.startswith(name + "*"):
            rest = key[len(name) + 1 :]
            extended = rest.endswith("*") or rest == ""
            index = rest.rstrip("*") or "0"
            if _SECTION.fullmatch(index) and (rest == "" or index == rest or extended):
                sections.setdefault(int(index), (extended, value))
    if 0 in sections:
        charset = ""
        data = bytearray()
        for position, section in enumerate(sorted(sections)):
            extended, value = sections[section]
            if extended:
                if position == 0:
                    pieces = value.split("'", 2)
                    if len(pieces) == 3:
                        charset, value = pieces[0], pieces[2]
                data += unquote_to_bytes(value)
            else:
                data += value.encode("utf-8", "replace")
        return decode_bytes(bytes(data), charset or "utf-8", strict=strict)
    if plain is not None and words:
        return decode_words(plain, strict=strict)
    return plain


def format_parameter(name: str, value: str) -> list[str]:
    """
    Write one parameter as one or more C{name=value} sections.

    Printable ASCII is written as a quoted string; anything else as RFC 2231
    UTF-8 sections of at most about 60 characters each.
    """
    if all(" " <= char <= "~" for char in value) and len(value) <= 900:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return [f'{name}="{escaped}"']
    encoded = quote(value.encode("utf-8", "replace"), safe=_ATTRIBUTE_SAFE)
    pieces: list[str] = []
    while encoded:
        cut = min(60, len(encoded))
        percent = encoded.rfind("%", max(0, cut - 2), cut)
        if percent >= 0 and cut < len(encoded):
            cut = percent
        pieces.append(encoded[:cut])
        encoded = encoded[cut:]
    if len(pieces) <= 1:
        return [f"{name}*=utf-8''{''.join(pieces)}"]
    return [f"{name}*0*=utf-8''{pieces[0]}"] + [
        f"{name}*{index}*={piece}" for index, piece in enumerate(pieces[1:], 1)
    ]


def clean_filename(name: str) -> str | None:
    """
    Make a decoded attachment name safe to show and to hand to Core: the
    last path component only, no control or format characters (such as the
    right-to-left override), at most 255 characters keeping the extension.

    @return: the name, or L{None} if nothing usable is left.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if char.isprintable()).strip()
    if name in ("", ".", ".."):
        return None
    if len(name) > 255:
        stem, dot, extension = name.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            name = stem[: 254 - len(extension)] + "." + extension
        else:
            name = name[:255]
    return name
