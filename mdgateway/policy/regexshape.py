# -*- test-case-name: tests.test_regexshape -*-
"""
The shape of a Python regular expression, read by a small parser of our own.

The safety check in L{mdgateway.policy.patterns} looks at the structure of
an operator's C{re:} pattern (which parts repeat, what each part can start
with) to refuse the shapes that backtrack catastrophically. CPython's own
parser is private and changes between releases, so we read the expression
ourselves into a tree holding just what the check needs.

C{re.compile} stays the judge of validity: L{parse_regex} is meant for
expressions it has accepted, and refuses with L{PatternError} anything it
does not understand rather than guess. It never recurses, so nesting is
bounded by C{re.compile} alone.

The tree follows the normalisations the C{re} engine itself makes, so the
check sees the shape the matcher will run:

  - a plain C{(?:...)} group leaves no node: its items join the enclosing
    sequence (C{(?:ab)c} is C{abc}), or become the body of the quantifier
    that follows it (C{(?:ab)*});
  - leading items shared by every alternative are moved in front of the
    alternation (C{ab|ac} is C{a(?:b|c)}); only characters, classes, C{.},
    anchors and backreferences are shared this way, never groups or
    repetitions;
  - an alternation of single characters and classes is one class
    (C{a|[bc]|\\d} is C{[abc\\d]});
  - a class holding one character is that character (C{[.]} is C{\\.},
    C{[aa]} is C{a}); duplicate class members are dropped.

Supported syntax: everything C{re.compile} accepts in a C{str} pattern, as
of Python 3.11:

  - characters, C{.}, the anchors C{^ $ \\A \\Z \\b \\B} (and C{\\z}, which
    Python 3.14 accepts for C{\\Z}), the categories
    C{\\d \\D \\s \\S \\w \\W};
  - escapes C{\\a \\f \\n \\r \\t \\v \\\\}, C{\\xhh}, C{\\uhhhh},
    C{\\Uhhhhhhhh}, C{\\N{NAME}}, C{\\0}, C{\\0o}, C{\\0oo}, three-digit
    octal C{\\ooo}, and a backslash before any other non-letter;
  - classes C{[...]} and C{[^...]} with characters, escapes (where C{\\b}
    is a backspace), categories and ranges C{a-z}; a C{]} first in the class
    and a C{-} first or last are literal (C{[]a]}, C{[^]a]}, C{[a-]});
  - groups: capturing C{(...)}, named C{(?P<name>...)}, non-capturing
    C{(?:...)}, atomic C{(?>...)}, flag-scoped C{(?i:...)}/C{(?-i:...)},
    lookahead C{(?=...)}/C{(?!...)}, lookbehind C{(?<=...)}/C{(?<!...)};
  - backreferences C{\\1}..C{\\99} and C{(?P=name)}, conditionals
    C{(?(1)yes|no)} and C{(?(name)yes|no)} (read, so the check can refuse
    them by name);
  - comments C{(?#...)}; global flags C{(?aiLmsux)} at the start, where
    C{x} turns on verbose mode (white space ignored outside classes, C{#}
    comments to the end of the line), also scoped with C{(?x:...)};
  - alternation C{|}; quantifiers C{* + ? {m} {m,} {,n} {m,n}}, each
    greedy, lazy (C{?} suffix) or possessive (C{+} suffix); a C{{} that
    does not start a valid quantifier is a literal.

The flags other than C{x} do not change the shape, so they are recorded
(on scoped groups) but not interpreted.
"""

from __future__ import annotations

import string
import unicodedata
from typing import TypeAlias

import attrs


class PatternError(ValueError):
    """
    A pattern cannot be used; the message says why, for a config problem line.
    """


# -- the tree ---------------------------------------------------------------


@attrs.frozen
class Char:
    """
    One character, as a node of a sequence or a member of a class.

    @ivar code: its code point.
    """

    code: int


@attrs.frozen
class CharRange:
    """
    A class member C{low-high}: the code points from C{low} to C{high}.
    """

    low: int
    high: int


#: The category escapes, by the letter after the backslash.
CATEGORIES = {
    "d": "digit",
    "D": "not_digit",
    "s": "space",
    "S": "not_space",
    "w": "word",
    "W": "not_word",
}


@attrs.frozen
class Category:
    """
    A class member for a category escape such as C{\\d}.

    @ivar name: one of the values of L{CATEGORIES}.
    """

    name: str


ClassMember: TypeAlias = Char | CharRange | Category


@attrs.frozen
class CharClass:
    """
    One character from a set: a class C{[...]}, or a category escape
    (C{\\d} is a class holding L{Category} C{digit}).

    @ivar members: the members, duplicates removed, in written order.
    @ivar negated: whether the class is C{[^...]}.
    """

    members: tuple[ClassMember, ...]
    negated: bool = False


@attrs.frozen
class AnyChar:
    """
    C{.}: any one character.
    """


#: The zero-width escapes, by the letter after the backslash, as L{Anchor}
#: kinds (Python 3.14 accepts C{\\z} for C{\\Z}).
_ANCHORS = {"A": "\\A", "b": "\\b", "B": "\\B", "Z": "\\Z", "z": "\\Z"}


@attrs.frozen
class Anchor:
    """
    A zero-width test of position: C{^}, C{$}, C{\\A}, C{\\Z}, C{\\b} or
    C{\\B}, as written (C{\\z} is written C{\\Z}).
    """

    kind: str


@attrs.frozen
class Group:
    """
    A capturing group, or a non-capturing group that sets flags.

    @ivar body: the sequence inside.
    @ivar index: the group number, L{None} for a flags-only group.
    @ivar name: the C{(?P<name>...)} name, if any.
    @ivar flags_on: the flags the group turns on (C{(?i:...)}).
    @ivar flags_off: the flags the group turns off (C{(?-i:...)}).
    """

    body: Nodes
    index: int | None = None
    name: str | None = None
    flags_on: str = ""
    flags_off: str = ""


@attrs.frozen
class Atomic:
    """
    An atomic group C{(?>...)}: once it matched, it never backtracks into.
    """

    body: Nodes


@attrs.frozen
class Lookaround:
    """
    A lookahead or lookbehind assertion: zero-width, its body is matched
    where it stands.

    @ivar behind: C{(?<=...)} or C{(?<!...)}.
    @ivar negative: C{(?!...)} or C{(?<!...)}.
    """

    body: Nodes
    behind: bool = False
    negative: bool = False


#: How a quantifier repeats: as many as it can, as few, or possessively.
MODES = ("greedy", "lazy", "possessive")


@attrs.frozen
class Repeat:
    """
    A quantified item.

    @ivar body: the sequence repeated (the item, or the contents of a plain
        C{(?:...)} group).
    @ivar low: the fewest repetitions.
    @ivar high: the most, or L{None} for no limit (C{*}, C{+}, C{{m,}}).
    @ivar mode: one of L{MODES}.
    """

    body: Nodes
    low: int
    high: int | None
    mode: str = "greedy"


@attrs.frozen
class Branch:
    """
    An alternation whose alternatives did not reduce to a class.
    """

    alternatives: tuple[Nodes, ...]


@attrs.frozen
class Backref:
    """
    A backreference, C{\\1} or C{(?P=name)}, by group number.
    """

    group: int


@attrs.frozen
class Conditional:
    """
    C{(?(group)yes|no)}: C{yes} if the group matched, else C{no}.

    @ivar no: L{None} when there is no C{|no} part.
    """

    group: int
    yes: Nodes
    no: Nodes | None


Node: TypeAlias = (
    Char
    | CharClass
    | AnyChar
    | Anchor
    | Group
    | Atomic
    | Lookaround
    | Repeat
    | Branch
    | Backref
    | Conditional
)
Nodes: TypeAlias = tuple[Node, ...]

#: Nodes an alternation may share as a common prefix: those equal by value
#: (the engine never merges two groups or two repetitions).
_SHAREABLE = (Char, CharClass, AnyChar, Anchor, Backref)


# -- the parser -------------------------------------------------------------

_SPECIAL = frozenset(".\\[{()*+?^$|")
_WHITESPACE = frozenset(" \t\n\r\v\f")
_DIGITS = frozenset(string.digits)
_OCTAL = frozenset(string.octdigits)
_HEX = frozenset(string.hexdigits)
_LETTERS = frozenset(string.ascii_letters)
_FLAGS = frozenset("aiLmstux")
_CODES = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_QUANTIFIERS: dict[str, tuple[int, int | None]] = {
    "?": (0, 1),
    "*": (0, None),
    "+": (1, None),
}


@attrs.frozen
class _Plain:
    """
    A plain C{(?:...)} group while its sequence is read: a quantifier may
    still take its contents as its body; otherwise they are spliced in.
    """

    body: Nodes


Item: TypeAlias = Node | _Plain


@attrs.define
class _Open:
    """
    A group whose C{)} has not been read yet (or the whole expression).

    @ivar kind: C{top}, C{group} (capturing or flags), C{plain}, C{atomic},
        C{look} or C{if}, saying what to build from the contents.
    @ivar verbose: whether the contents are read in verbose mode.
    @ivar alternatives: the sequences before each C{|} read so far.
    @ivar items: the sequence being read.
    """

    kind: str
    verbose: bool
    index: int | None = None
    name: str | None = None
    flags_on: str = ""
    flags_off: str = ""
    behind: bool = False
    negative: bool = False
    condition: int = 0
    alternatives: list[list[Node]] = attrs.Factory(list)
    items: list[Item] = attrs.Factory(list)


def parse_regex(source: str) -> Nodes:
    """
    Read a regular expression that C{re.compile} accepted into its shape.

    @raise PatternError: for syntax this parser does not understand (which
        includes everything C{re.compile} refuses).
    """
    return _Parser(source).parse()


class _Parser:
    """
    One pass over a pattern, token by token: a token is one character, or a
    backslash and the character after it.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.groups = 0
        self.names: dict[str, int] = {}

    def refuse(self, what: str) -> PatternError:
        return PatternError(
            f"regular expression not understood at position {self.pos}: {what}"
        )

    def peek(self) -> str | None:
        text, pos = self.text, self.pos
        if pos >= len(text):
            return None
        if text[pos] == "\\":
            if pos + 1 >= len(text):
                raise self.refuse("a trailing backslash")
            return text[pos : pos + 2]
        return text[pos]

    def take(self) -> str | None:
        token = self.peek()
        if token is not None:
            self.pos += len(token)
        return token

    def accept(self, token: str) -> bool:
        if self.peek() == token:
            self.pos += len(token)
            return True
        return False

    def chars(self, allowed: frozenset[str], most: int) -> str:
        """
        Up to C{most} characters from C{allowed}, as many as there are.
        """
        start = self.pos
        while self.pos - start < most and self.pos < len(self.text):
            if self.text[self.pos] not in allowed:
                break
            self.pos += 1
        return self.text[start : self.pos]

    def until(self, terminator: str) -> str:
        """
        The non-empty text up to C{terminator}, which is consumed.
        """
        start = self.pos
        while (token := self.take()) != terminator:
            if token is None:
                raise self.refuse(f"no {terminator!r}")
        text = self.text[start : self.pos - 1]
        if not text:
            raise self.refuse(f"nothing before {terminator!r}")
        return text

    # -- structure ----------------------------------------------------------

    def parse(self) -> Nodes:
        stack = [_Open("top", verbose=False)]
        while (token := self.take()) is not None:
            frame = stack[-1]
            if token == "|":
                frame.alternatives.append(_splice(frame.items))
                frame.items = []
                if frame.kind == "if" and len(frame.alternatives) > 1:
                    raise self.refuse("a conditional with more than two branches")
            elif token == ")":
                if len(stack) == 1:
                    raise self.refuse("an unbalanced parenthesis")
                stack.pop()
                stack[-1].items.append(_close(frame))
            elif frame.verbose and token in _WHITESPACE:
                continue
            elif frame.verbose and token == "#":
                while (token := self.take()) not in (None, "\n"):
                    pass
            elif token == "(":
                opened = self.open(frame)
                if isinstance(opened, _Open):
                    stack.append(opened)
                elif opened is not None:
                    frame.items.append(opened)
            else:
                self.atom(token, frame.items)
        if len(stack) > 1:
            raise self.refuse("a missing )")
        top = stack[0]
        top.alternatives.append(_splice(top.items))
        return tuple(_combine(top.alternatives))

    def open(self, frame: _Open) -> _Open | Backref | None:
        """
        Read what follows a C{(}: a group to open, a C{(?P=name)}
        backreference, or L{None} for a comment or global flags.
        """
        if not self.accept("?"):
            return self.capture(frame, None)
        token = self.take()
        if token == "P":
            if self.accept("<"):
                return self.capture(frame, self.until(">"))
            if self.accept("="):
                return Backref(self.group_named(self.until(")")))
            raise self.refuse("an unknown (?P extension")
        if token == ":":
            return _Open("plain", frame.verbose)
        if token == ">":
            return _Open("atomic", frame.verbose)
        if token == "#":
            while (token := self.take()) != ")":
                if token is None:
                    raise self.refuse("an unterminated comment")
            return None
        if token in ("=", "!"):
            return _Open("look", frame.verbose, negative=token == "!")
        if token == "<":
            token = self.take()
            if token in ("=", "!"):
                return _Open("look", frame.verbose, behind=True, negative=token == "!")
            raise self.refuse("an unknown (?< extension")
        if token == "(":
            return _Open("if", frame.verbose, condition=self.condition())
        if token is not None and (token in _FLAGS or token == "-"):
            return self.flags(frame, token)
        raise self.refuse(f"an unknown group extension (?{token or ''}")

    def capture(self, frame: _Open, name: str | None) -> _Open:
        self.groups += 1
        if name is not None:
            self.names[name] = self.groups
        return _Open("group", frame.verbose, index=self.groups, name=name)

    def group_named(self, name: str) -> int:
        if name not in self.names:
            raise self.refuse(f"an unknown group name {name!r}")
        return self.names[name]

    def condition(self) -> int:
        """
        The group a conditional C{(?(...)} tests, by number.
        """
        text = self.until(")")
        if text.isidentifier():
            return self.group_named(text)
        try:
            group = int(text)
        except ValueError:
            raise self.refuse(f"a bad group reference {text!r}") from None
        if group < 1:
            raise self.refuse(f"a bad group reference {text!r}")
        return group

    def flags(self, frame: _Open, token: str | None) -> _Open | None:
        """
        Read inline flags after C{(?}: global C{(?x)} (L{None}), or a scoped
        C{(?i-s:} group to open.
        """
        on = off = ""
        while token not in ("-", ":", ")"):
            if token is None or token not in _FLAGS:
                raise self.refuse("a bad inline flag")
            on += token
            token = self.take()
        if token == ")":
            if frame.kind != "top" or frame.alternatives or frame.items:
                raise self.refuse("global flags not at the start")
            frame.verbose = frame.verbose or "x" in on
            return None
        if token == "-":
            while (token := self.take()) != ":" or not off:
                if token is None or token not in _FLAGS:
                    raise self.refuse("a bad inline flag")
                off += token
        verbose = (frame.verbose or "x" in on) and "x" not in off
        return _Open("group", verbose, flags_on=on, flags_off=off)

    # -- items --------------------------------------------------------------

    def atom(self, token: str, items: list[Item]) -> None:
        """
        Read one token that is not part of the group structure.
        """
        if token[0] == "\\":
            items.append(self.escape(token[1]))
        elif token not in _SPECIAL:
            items.append(Char(ord(token)))
        elif token == "[":
            items.append(self.char_class())
        elif token == ".":
            items.append(AnyChar())
        elif token in ("^", "$"):
            items.append(Anchor(token))
        else:
            self.quantifier(token, items)

    def quantifier(self, token: str, items: list[Item]) -> None:
        if token == "{":
            bounds = self.braces()
            if bounds is None:
                items.append(Char(ord("{")))
                return
            low, high = bounds
        else:
            low, high = _QUANTIFIERS[token]
        if high is not None and high < low:
            raise self.refuse("a quantifier whose minimum exceeds its maximum")
        if not items or isinstance(items[-1], (Anchor, Repeat)):
            raise self.refuse("nothing to repeat")
        last = items[-1]
        if self.accept("?"):
            mode = "lazy"
        elif self.accept("+"):
            mode = "possessive"
        else:
            mode = "greedy"
        body = last.body if isinstance(last, _Plain) else (last,)
        items[-1] = Repeat(body, low, high, mode)

    def braces(self) -> tuple[int, int | None] | None:
        """
        The bounds of a C{{m,n}} quantifier, or L{None} (and nothing read)
        when the C{{} is a literal.
        """
        start = self.pos
        if self.peek() == "}":
            return None
        low = self.chars(_DIGITS, len(self.text))
        high = self.chars(_DIGITS, len(self.text)) if self.accept(",") else low
        if not self.accept("}"):
            self.pos = start
            return None
        return int(low) if low else 0, int(high) if high else None

    def escape(self, letter: str) -> Node:
        """
        The node for a backslash and C{letter} outside a class.
        """
        if letter in _ANCHORS:
            return Anchor(_ANCHORS[letter])
        if letter in CATEGORIES:
            return CharClass((Category(CATEGORIES[letter]),))
        if letter in _CODES:
            return Char(_CODES[letter])
        code = self.code_escape(letter)
        if code is not None:
            return Char(code)
        if letter == "0":
            return Char(int(letter + self.chars(_OCTAL, 2), 8))
        if letter in _DIGITS:
            digits = letter + self.chars(_DIGITS, 1)
            if len(digits) == 2 and _OCTAL.issuperset(digits):
                third = self.chars(_OCTAL, 1)
                if third:
                    return Char(self.octal(digits + third))
            group = int(digits)
            if group > self.groups:
                raise self.refuse(f"a reference to a missing group {group}")
            return Backref(group)
        if letter in _LETTERS:
            raise self.refuse(f"an unknown escape \\{letter}")
        return Char(ord(letter))

    def class_escape(self, letter: str) -> Char | Category:
        """
        The class member for a backslash and C{letter} inside a class.
        """
        if letter == "b":
            return Char(8)
        if letter in _CODES:
            return Char(_CODES[letter])
        if letter in CATEGORIES:
            return Category(CATEGORIES[letter])
        code = self.code_escape(letter)
        if code is not None:
            return Char(code)
        if letter in _OCTAL:
            return Char(self.octal(letter + self.chars(_OCTAL, 2)))
        if letter in _DIGITS or letter in _LETTERS:
            raise self.refuse(f"an unknown escape \\{letter} in a class")
        return Char(ord(letter))

    def code_escape(self, letter: str) -> int | None:
        """
        The code point of a C{\\x}, C{\\u}, C{\\U} or C{\\N} escape, or
        L{None} when C{letter} is none of these.
        """
        if letter in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[letter]
            digits = self.chars(_HEX, width)
            if len(digits) != width or int(digits, 16) > 0x10FFFF:
                raise self.refuse(f"a bad \\{letter} escape")
            return int(digits, 16)
        if letter == "N":
            if not self.accept("{"):
                raise self.refuse("\\N without {")
            name = self.until("}")
            try:
                return ord(unicodedata.lookup(name))
            except (KeyError, TypeError):
                raise self.refuse(f"an unknown character name {name!r}") from None
        return None

    def octal(self, digits: str) -> int:
        code = int(digits, 8)
        if code > 0o377:
            raise self.refuse(f"an octal escape above 0o377: \\{digits}")
        return code

    def char_class(self) -> Char | CharClass:
        """
        Read a class after its C{[}.
        """
        negated = self.accept("^")
        members: list[ClassMember] = []
        while True:
            token = self.take()
            if token is None:
                raise self.refuse("an unterminated class")
            if token == "]" and members:
                break
            first = self.member(token)
            if not self.accept("-"):
                members.append(first)
                continue
            token = self.take()
            if token is None:
                raise self.refuse("an unterminated class")
            if token == "]":
                members.extend((first, Char(ord("-"))))
                break
            last = self.member(token)
            if not (isinstance(first, Char) and isinstance(last, Char)):
                raise self.refuse("a range with a category at one end")
            if last.code < first.code:
                raise self.refuse("a range that runs backwards")
            members.append(CharRange(first.code, last.code))
        unique = tuple(dict.fromkeys(members))
        if len(unique) == 1 and isinstance(unique[0], Char) and not negated:
            return unique[0]
        return CharClass(unique, negated)

    def member(self, token: str) -> Char | Category:
        if token[0] == "\\":
            return self.class_escape(token[1])
        return Char(ord(token))


def _splice(items: list[Item]) -> list[Node]:
    """
    A finished sequence: plain groups that were not quantified give way to
    their contents.
    """
    nodes: list[Node] = []
    for item in items:
        if isinstance(item, _Plain):
            nodes.extend(item.body)
        else:
            nodes.append(item)
    return nodes


def _combine(alternatives: list[list[Node]]) -> list[Node]:
    """
    The sequence for C{a|b|...}: leading items every alternative shares are
    moved in front, and alternatives that are single characters or classes
    become one class; otherwise a L{Branch} remains.
    """
    if len(alternatives) == 1:
        return alternatives[0]
    prefix: list[Node] = []
    while all(alternatives):
        head = alternatives[0][0]
        if not isinstance(head, _SHAREABLE):
            break
        if any(alternative[0] != head for alternative in alternatives[1:]):
            break
        prefix.append(head)
        for alternative in alternatives:
            del alternative[0]
    members: list[ClassMember] = []
    for alternative in alternatives:
        if len(alternative) != 1:
            break
        node = alternative[0]
        if isinstance(node, Char):
            members.append(node)
        elif isinstance(node, CharClass) and not node.negated:
            members.extend(node.members)
        else:
            break
    else:
        return [*prefix, CharClass(tuple(dict.fromkeys(members)))]
    return [*prefix, Branch(tuple(tuple(a) for a in alternatives))]


def _close(frame: _Open) -> Item:
    """
    The item a group becomes once its C{)} is read.
    """
    frame.alternatives.append(_splice(frame.items))
    if frame.kind == "if":
        yes, *no = frame.alternatives
        return Conditional(frame.condition, tuple(yes), tuple(no[0]) if no else None)
    body = tuple(_combine(frame.alternatives))
    if frame.kind == "plain":
        return _Plain(body)
    if frame.kind == "atomic":
        return Atomic(body)
    if frame.kind == "look":
        return Lookaround(body, frame.behind, frame.negative)
    return Group(body, frame.index, frame.name, frame.flags_on, frame.flags_off)
