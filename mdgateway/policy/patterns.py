# -*- test-case-name: tests.test_patterns,tests.test_regexshape -*-
"""
Sender and recipient patterns of security rules: parsing, safety checks and
matching.

A rule's C{senders} and C{recipients} filters are lists of patterns. They are
parsed and compiled once when the config loads, so matching an envelope
address costs a normalisation and a few set look-ups. Regular expressions
come from operators and are matched against addresses sent by strangers, so
the shapes that can take exponential time are refused at load time rather
than discovered when a crafted address stalls the gateway.

Forms (see C{docs/policy.md}):

  - C{example.com}: addresses at exactly that domain;
  - C{*.example.com}: addresses at any subdomain of it (not the domain itself);
  - C{alice@example.com}: exactly that address;
  - a glob with C{*} (any run of characters) or C{?} (one character): with an
    C{@} it is matched against the whole address (C{bounce-*@*}), without one
    against the domain (C{mail?.example.com});
  - C{re:REGEX}: a Python regular expression that must match the whole
    address (C{re.fullmatch}), case-insensitively;
  - C{<>}: the null reverse-path (bounces);
  - C{*}: everything, the null reverse-path included.

Addresses and patterns are compared case-insensitively, local parts included,
after Unicode NFC normalisation and case folding; a domain written in its
ASCII (C{xn--}) form and its Unicode form are the same domain.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from mdgateway.policy.regexshape import (
    Anchor,
    AnyChar,
    Atomic,
    Backref,
    Branch,
    Char,
    CharClass,
    CharRange,
    ClassMember,
    Conditional,
    Group,
    Lookaround,
    Node,
    Nodes,
    PatternError,
    Repeat,
    parse_regex,
)

#: Longest pattern accepted, in characters. Addresses are at most 256 octets
#: on the wire (RFC 5321 section 4.5.3.1.3); a longer pattern is a mistake.
MAX_PATTERN_LENGTH = 512

#: Longest address a C{re:} pattern is tried against. Longer text cannot
#: come from a valid SMTP path, and bounding it bounds the polynomial cost of
#: the regular expressions the safety check lets through.
MAX_REGEX_SUBJECT = 512

#: Most open-ended quantifiers (C{*}, C{+}, C{{n,}}) one regular expression
#: may use: several overlapping ones in a row take polynomial time.
MAX_OPEN_QUANTIFIERS = 3

#: Most choice points (variable-length quantifiers such as C{?} or
#: C{{1,5}}, and ambiguous alternations) one regular expression may use.
MAX_CHOICE_POINTS = 10

#: Outer repeat count up to which a bounded repetition may contain another
#: bounded variable repetition, so C{(\\d{1,3}\\.){3}} stays allowed.
_SMALL_REPEAT = 4

#: Addresses used to ask whether a recipient filter would take mail for an
#: arbitrary domain (the open-relay guard in L{AddressFilter.open_ended}).
_PROBE_LOCALS = ("mdgateway-relay-probe", "postmaster")
_PROBE_DOMAINS = (
    "mdgateway-relay-probe.invalid",
    "mdgateway-relay-probe.com",
    "mdgateway-relay-probe.net",
    "mdgateway-relay-probe.org",
)

_BAD_DOMAIN_CHARS = frozenset('"()<>[]\\,;:@')


@attrs.frozen
class NormalAddress:
    """
    An envelope address in the form patterns are matched against.

    @ivar text: C{local@domain} with the local part and domain case-folded,
        the domain in Unicode form; C{""} for the null reverse-path.
    @ivar domain: the normalised domain, or L{None} for the null reverse-path
        and for an address without C{@} (C{RCPT TO:<Postmaster>}).
    """

    text: str
    domain: str | None


def normalize_local(local: str) -> str:
    """
    Case-fold a local part: the gateway treats local parts case-insensitively.
    """
    return unicodedata.normalize("NFC", local).casefold()


def _decode_label(label: str) -> str:
    if label[:4].lower() == "xn--" and "*" not in label and "?" not in label:
        try:
            return label[4:].encode("ascii").decode("punycode")
        except (UnicodeError, ValueError):
            return label
    return label


def normalize_domain(domain: str) -> str:
    """
    Put a domain in one comparable form: A-labels (C{xn--...}) decoded to
    Unicode, NFC-normalised and case-folded, so C{XN--BCHER-KVA.example} and
    C{bücher.example} compare equal. Wildcard labels are left encoded.
    """
    if domain.startswith("["):
        return domain.casefold()
    decoded = ".".join(_decode_label(label) for label in domain.split("."))
    return unicodedata.normalize("NFC", decoded).casefold()


def normalize_address(address: str) -> NormalAddress:
    """
    Normalise an envelope address (C{""} is the null reverse-path).
    """
    if address == "":
        return NormalAddress("", None)
    local, at, domain = address.rpartition("@")
    if not at:
        return NormalAddress(normalize_local(address), None)
    normal = normalize_domain(domain)
    return NormalAddress(f"{normalize_local(local)}@{normal}", normal)


# -- globs ------------------------------------------------------------------


def _glob_segment(segment: str) -> str:
    return "".join("." if c == "?" else re.escape(c) for c in segment)


def compile_glob(glob: str) -> re.Pattern[str]:
    """
    Compile a C{*}/C{?} glob into a regular expression for C{fullmatch}.

    Each fixed run between two stars is found by an atomic lazy scan, which
    commits to its leftmost occurrence; that is always right for a glob and
    keeps matching linear instead of the polynomial backtracking a naive
    C{.*} translation has on C{*a*a*a*b}.
    """
    segments = glob.split("*")
    if len(segments) == 1:
        return re.compile(_glob_segment(glob), re.DOTALL)
    parts = [_glob_segment(segments[0])]
    parts.extend(f"(?>.*?{_glob_segment(s)})" for s in segments[1:-1])
    parts.append(".*" + _glob_segment(segments[-1]))
    return re.compile("".join(parts), re.DOTALL)


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


# -- regular expression safety -----------------------------------------------

_ANY_ATOM = ("any",)
_CATEGORY_RE = {
    "digit": re.compile(r"\d"),
    "not_digit": re.compile(r"\D"),
    "space": re.compile(r"\s"),
    "not_space": re.compile(r"\S"),
    "word": re.compile(r"\w"),
    "not_word": re.compile(r"\W"),
}
#: Characters sampled when deciding whether two classes can share a first
#: character; ranges wider than this are assumed to overlap.
_SAMPLE = 4096

#: What a part of an expression can start with: C{("lit", code)},
#: C{("range", low, high)}, C{("cat", name)} or C{("any",)}.
Atom = tuple[Any, ...]


def _fold(cp: int) -> set[int]:
    c = chr(cp)
    found = {cp}
    for other in (c.lower(), c.upper(), c.casefold()):
        if len(other) == 1:
            found.add(ord(other))
    return found


def _atom_contains(atom: Atom, cp: int) -> bool:
    kind = atom[0]
    if kind == "any":
        return True
    if kind == "lit":
        return cp in _fold(atom[1])
    if kind == "range":
        return any(atom[1] <= c <= atom[2] for c in _fold(cp))
    return any(_CATEGORY_RE[atom[1]].match(chr(c)) for c in _fold(cp))


def _atom_sample(atom: Atom) -> range | None:
    """
    The code points to try for an atom, or L{None} when too many.
    """
    if atom[0] == "lit":
        return range(atom[1], atom[1] + 1)
    if atom[0] == "range" and atom[2] - atom[1] < _SAMPLE:
        return range(atom[1], atom[2] + 1)
    if atom[0] == "cat":
        return range(_SAMPLE)
    return None


@functools.lru_cache(maxsize=1024)
def _atoms_overlap(a: Atom, b: Atom) -> bool:
    if a[0] == "any" or b[0] == "any":
        return True
    sample_a, sample_b = _atom_sample(a), _atom_sample(b)
    if a[0] != "cat" and sample_a is not None:
        return any(_atom_contains(b, cp) for cp in sample_a)
    if b[0] != "cat" and sample_b is not None:
        return any(_atom_contains(a, cp) for cp in sample_b)
    if a[0] == "cat" and b[0] == "cat":
        return any(
            _atom_contains(a, cp) and _atom_contains(b, cp) for cp in range(_SAMPLE)
        )
    return True


def _member_atom(member: ClassMember) -> Atom:
    if isinstance(member, Char):
        return ("lit", member.code)
    if isinstance(member, CharRange):
        return ("range", member.low, member.high)
    return ("cat", member.name)


def _first(nodes: Iterable[Node]) -> tuple[list[Atom], bool]:
    """
    The characters a sequence can start with, and whether it can match the
    empty string.
    """
    atoms: list[Atom] = []
    for node in nodes:
        item, nullable = _first_item(node)
        atoms.extend(item)
        if not nullable:
            return atoms, False
    return atoms, True


def _first_item(node: Node) -> tuple[list[Atom], bool]:
    if isinstance(node, Char):
        return [("lit", node.code)], False
    if isinstance(node, CharClass):
        if node.negated:
            return [_ANY_ATOM], False
        return [_member_atom(member) for member in node.members], False
    if isinstance(node, AnyChar):
        return [_ANY_ATOM], False
    if isinstance(node, (Group, Atomic)):
        return _first(node.body)
    if isinstance(node, Branch):
        atoms: list[Atom] = []
        nullable = False
        for alternative in node.alternatives:
            alt_atoms, alt_nullable = _first(alternative)
            atoms.extend(alt_atoms)
            nullable = nullable or alt_nullable
        return atoms, nullable
    if isinstance(node, Repeat):
        atoms, nullable = _first(node.body)
        return atoms, nullable or node.low == 0
    if isinstance(node, (Anchor, Lookaround)):
        return [], True
    # A backreference or a conditional: any text, perhaps none.
    return [_ANY_ATOM], True


def _ambiguous(alternatives: Sequence[Nodes]) -> bool:
    """
    Whether two alternatives of a branch can begin the same way (or both
    match nothing), which makes a repeated alternation exponential.
    """
    firsts = [_first(alternative) for alternative in alternatives]
    for i, (atoms_i, nullable_i) in enumerate(firsts):
        for atoms_j, nullable_j in firsts[i + 1 :]:
            if nullable_i and nullable_j:
                return True
            if any(_atoms_overlap(a, b) for a in atoms_i for b in atoms_j):
                return True
    return False


@attrs.define
class _Shape:
    open_quantifiers: int = 0
    choice_points: int = 0


_NESTED = (
    "nested quantifiers (a repetition inside a repetition, such as (a+)+ or "
    "([a-z]+\\.)+) can take exponential time; use a glob or several patterns"
)
_ALTERNATION = (
    "repeated alternation whose branches can match the same text, such as "
    "(a|a)* or (a|ab?)+, can take exponential time"
)


def _walk(nodes: Iterable[Node], enclosing: float, shape: _Shape) -> None:
    """
    Check the shape of a regular expression for parts that backtrack badly.

    @param enclosing: the largest repeat count of the repetitions around
        C{nodes} (0 when not inside a repetition that can run twice;
        infinite inside an open-ended one).
    """
    for node in nodes:
        if isinstance(node, Repeat):
            variable = node.low != node.high
            unbounded = node.high is None
            shape.open_quantifiers += unbounded
            shape.choice_points += variable
            if enclosing and variable and (unbounded or enclosing > _SMALL_REPEAT):
                raise PatternError(_NESTED)
            most = math.inf if node.high is None else node.high
            _walk(node.body, max(enclosing, most if most >= 2 else 0), shape)
        elif isinstance(node, Branch):
            if _ambiguous(node.alternatives):
                if enclosing:
                    raise PatternError(_ALTERNATION)
                shape.choice_points += 1
            for alternative in node.alternatives:
                _walk(alternative, enclosing, shape)
        elif isinstance(node, (Group, Atomic, Lookaround)):
            _walk(node.body, enclosing, shape)
        elif isinstance(node, (Backref, Conditional)):
            raise PatternError(
                "backreferences and conditional groups are not supported"
            )


def compile_regex(source: str) -> re.Pattern[str]:
    """
    Compile an operator's regular expression, refusing invalid ones and the
    shapes that can backtrack catastrophically.

    The check is conservative: it refuses nested variable repetition (such
    as C{(a+)+}, C{(.*)*}), repeated alternations whose branches overlap
    (C{(a|a)*}), backreferences, more than L{MAX_OPEN_QUANTIFIERS}
    open-ended and more than L{MAX_CHOICE_POINTS} variable quantifiers.
    C{re.compile} judges validity; the shape is read by
    L{mdgateway.policy.regexshape.parse_regex}, which refuses what it does
    not understand.

    @raise PatternError: with a message fit for a config problem line.
    """
    if not source:
        raise PatternError("empty regular expression")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            compiled = re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise PatternError(f"invalid regular expression: {e}") from None
        except (Warning, RecursionError, OverflowError) as e:
            raise PatternError(f"unusable regular expression: {e}") from None
    shape = _Shape()
    try:
        _walk(parse_regex(source), 0, shape)
    except RecursionError as e:
        raise PatternError(f"unusable regular expression: {e}") from None
    if shape.open_quantifiers > MAX_OPEN_QUANTIFIERS:
        raise PatternError(
            f"more than {MAX_OPEN_QUANTIFIERS} open-ended quantifiers "
            "(*, +, {n,}) can take polynomial time; split it into several "
            "patterns"
        )
    if shape.choice_points > MAX_CHOICE_POINTS:
        raise PatternError(
            f"more than {MAX_CHOICE_POINTS} optional or variable-length parts "
            "can take exponential time; split it into several patterns"
        )
    return compiled


# -- patterns ---------------------------------------------------------------

#: Pattern kinds, in the order of the module docstring.
KINDS = (
    "domain",
    "subdomains",
    "address",
    "address_glob",
    "domain_glob",
    "regex",
    "null",
    "any",
)


@attrs.frozen
class AddressPattern:
    """
    One parsed sender or recipient pattern.

    @ivar text: the pattern as configured (for logs and the admin API).
    @ivar kind: one of L{KINDS}.
    @ivar value: the normalised literal (C{domain}, C{subdomains},
        C{address}) or glob; the regular expression source for C{regex}.
    @ivar regex: the compiled glob or regular expression, when there is one.
    """

    text: str
    kind: str
    value: str = ""
    regex: re.Pattern[str] | None = attrs.field(default=None, eq=False)

    def matches(self, address: str) -> bool:
        """
        Whether this pattern matches an envelope address (C{""} is null).
        """
        return self.matches_normal(normalize_address(address))

    def matches_normal(self, address: NormalAddress) -> bool:
        kind = self.kind
        if kind == "any":
            return True
        if kind == "null":
            return address.text == ""
        if kind == "address":
            return address.text == self.value
        if kind == "regex":
            assert self.regex is not None
            return (
                len(address.text) <= MAX_REGEX_SUBJECT
                and self.regex.fullmatch(address.text) is not None
            )
        if kind == "address_glob":
            assert self.regex is not None
            return self.regex.fullmatch(address.text) is not None
        domain = address.domain
        if domain is None:
            return False
        if kind == "domain":
            return domain == self.value
        if kind == "subdomains":
            return domain.endswith("." + self.value)
        assert self.regex is not None
        return self.regex.fullmatch(domain) is not None


def _check_domain(domain: str, glob: bool) -> None:
    if domain.startswith("[") and domain.endswith("]") and not glob:
        return
    if domain.endswith("."):
        raise PatternError("a domain does not end with a dot")
    for label in domain.split("."):
        if not label:
            raise PatternError(f"empty label in domain {domain!r}")
        if _BAD_DOMAIN_CHARS.intersection(label):
            raise PatternError(f"not a domain: {domain!r}")


def parse_pattern(text: str) -> AddressPattern:
    """
    Parse one sender or recipient pattern.

    @raise PatternError: when the pattern is empty, too long, malformed, or an
        unsafe regular expression.
    """
    if not text:
        raise PatternError("empty pattern")
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"longer than {MAX_PATTERN_LENGTH} characters")
    if text.startswith("re:"):
        source = text[3:]
        return AddressPattern(text, "regex", source, compile_regex(source))
    if any(c.isspace() or not c.isprintable() for c in text):
        raise PatternError("white space or control characters in a pattern")
    if text == "<>":
        return AddressPattern(text, "null")
    if text == "*":
        return AddressPattern(text, "any")
    if text.startswith("<") or text.endswith(">"):
        raise PatternError(
            "write addresses without angle brackets (<> alone is the null sender)"
        )
    wild = _has_wildcard(text)
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if not local or not domain:
            raise PatternError(
                f"not an address: {text!r} (a domain alone is written "
                "example.com, any address *@*)"
            )
        _check_domain(domain, wild)
        value = f"{normalize_local(local)}@{normalize_domain(domain)}"
        if wild:
            return AddressPattern(text, "address_glob", value, compile_glob(value))
        return AddressPattern(text, "address", value)
    if text.startswith("."):
        raise PatternError(f"write '*{text}' for the subdomains of {text[1:]}")
    _check_domain(text, wild)
    if text.startswith("*.") and not _has_wildcard(text[2:]):
        return AddressPattern(text, "subdomains", normalize_domain(text[2:]))
    value = normalize_domain(text)
    if wild:
        return AddressPattern(text, "domain_glob", value, compile_glob(value))
    return AddressPattern(text, "domain", value)


def _parent_domains(domain: str) -> Iterable[str]:
    """
    Yield C{b.c} and C{c} for C{a.b.c}.
    """
    index = domain.find(".")
    while index != -1:
        yield domain[index + 1 :]
        index = domain.find(".", index + 1)


@attrs.frozen
class AddressFilter:
    """
    A rule's sender or recipient filter: an address matches when any of its
    patterns does. An empty filter matches every address.

    Literal addresses, domains and subdomain patterns go into sets, so a
    filter with thousands of them still matches in a few look-ups.
    """

    patterns: tuple[AddressPattern, ...] = ()
    _anything: bool = attrs.field(init=False, eq=False, repr=False)
    _addresses: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    _domains: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    _parents: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    _others: tuple[AddressPattern, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        kinds: dict[str, list[AddressPattern]] = {kind: [] for kind in KINDS}
        for pattern in self.patterns:
            kinds[pattern.kind].append(pattern)
        literal = ("address", "domain", "subdomains", "any")
        others = tuple(p for p in self.patterns if p.kind not in literal)
        setter = object.__setattr__
        setter(self, "_anything", not self.patterns or bool(kinds["any"]))
        setter(self, "_addresses", frozenset(p.value for p in kinds["address"]))
        setter(self, "_domains", frozenset(p.value for p in kinds["domain"]))
        setter(self, "_parents", frozenset(p.value for p in kinds["subdomains"]))
        setter(self, "_others", others)

    @classmethod
    def of(cls, *texts: str) -> AddressFilter:
        """
        Build a filter from pattern texts (for code that embeds the gateway).

        @raise PatternError: for the first unusable pattern.
        """
        return cls(tuple(parse_pattern(text) for text in texts))

    @property
    def texts(self) -> tuple[str, ...]:
        """
        The patterns as configured.
        """
        return tuple(p.text for p in self.patterns)

    @property
    def anything(self) -> bool:
        """
        Whether this filter matches every address (no patterns, or C{*}).
        """
        return self._anything

    def matches(self, address: str) -> bool:
        """
        Whether an envelope address (C{""} for the null reverse-path) matches.
        """
        return self._anything or self.matches_normal(normalize_address(address))

    def matches_normal(self, address: NormalAddress) -> bool:
        """
        L{matches} for an address already normalised by L{normalize_address}.
        """
        if self._anything or address.text in self._addresses:
            return True
        domain = address.domain
        if domain is not None:
            if domain in self._domains:
                return True
            if self._parents and any(
                parent in self._parents for parent in _parent_domains(domain)
            ):
                return True
        return any(p.matches_normal(address) for p in self._others)

    def open_ended(self) -> bool:
        """
        Whether this filter would take mail for domains nobody configured
        (C{*}, C{*@*}, C{*.com}, C{re:.*@.*}, ...): the recipient half of the
        open-relay guard. A heuristic: it probes a few made-up addresses.
        """
        if self._anything:
            return True
        return any(
            self.matches_normal(normalize_address(f"{local}@{domain}"))
            for local in _PROBE_LOCALS
            for domain in _PROBE_DOMAINS
        )


#: The filter of a rule that does not filter on this address.
ANY_ADDRESS = AddressFilter()
