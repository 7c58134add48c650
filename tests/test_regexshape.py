"""
Tests for L{mdgateway.policy.regexshape}, the parser the regular-expression
safety check reads operators' C{re:} patterns with.

Besides examples of each piece of syntax, property tests compare the safety
check with the one it replaced, which walked CPython's private C{re._parser}
tree. That old check is kept here, in the tests only, as the oracle: for
every generated expression both must give the same verdict (accepted, or
the same refusal message). Set C{MDGATEWAY_REGEX_EXAMPLES} to run more
examples than the few hundred CI runs.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import re._constants as _sre  # the oracle only: product code may not
import re._parser as _sre_parse  # the oracle only: product code may not
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.policy import patterns
from mdgateway.policy.patterns import (
    MAX_CHOICE_POINTS,
    MAX_OPEN_QUANTIFIERS,
    compile_regex,
)
from mdgateway.policy.regexshape import (
    Anchor,
    AnyChar,
    Atomic,
    Backref,
    Branch,
    Category,
    Char,
    CharClass,
    CharRange,
    Conditional,
    Group,
    Lookaround,
    PatternError,
    Repeat,
    parse_regex,
)

#: Examples per property test; CI keeps the default, a local run can ask
#: for thousands.
EXAMPLES = int(os.environ.get("MDGATEWAY_REGEX_EXAMPLES", "300"))

PACKAGE = Path(__file__).resolve().parent.parent / "mdgateway"


def c(text: str) -> Char:
    return Char(ord(text))


def klass(*members: Char | CharRange | Category, negated: bool = False) -> CharClass:
    return CharClass(tuple(members), negated)


# -- the oracle: the safety check as it was, on re._parser ---------------------

_OLD_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)
_OLD_ZERO_WIDTH = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)
_OLD_ANY_ATOM = ("any",)
_OLD_CATEGORY_RE = {
    "CATEGORY_DIGIT": re.compile(r"\d"),
    "CATEGORY_NOT_DIGIT": re.compile(r"\D"),
    "CATEGORY_SPACE": re.compile(r"\s"),
    "CATEGORY_NOT_SPACE": re.compile(r"\S"),
    "CATEGORY_WORD": re.compile(r"\w"),
    "CATEGORY_NOT_WORD": re.compile(r"\W"),
}
_OLD_SAMPLE = 4096
_OLD_SMALL_REPEAT = 4
_OLD_NESTED = (
    "nested quantifiers (a repetition inside a repetition, such as (a+)+ or "
    "([a-z]+\\.)+) can take exponential time; use a glob or several patterns"
)
_OLD_ALTERNATION = (
    "repeated alternation whose branches can match the same text, such as "
    "(a|a)* or (a|ab?)+, can take exponential time"
)

OldAtom = tuple[Any, ...]


def _old_fold(cp: int) -> set[int]:
    ch = chr(cp)
    found = {cp}
    for other in (ch.lower(), ch.upper(), ch.casefold()):
        if len(other) == 1:
            found.add(ord(other))
    return found


def _old_atom_contains(atom: OldAtom, cp: int) -> bool:
    kind = atom[0]
    if kind == "any":
        return True
    if kind == "lit":
        return cp in _old_fold(atom[1])
    if kind == "range":
        return any(atom[1] <= x <= atom[2] for x in _old_fold(cp))
    return any(_OLD_CATEGORY_RE[atom[1]].match(chr(x)) for x in _old_fold(cp))


def _old_atom_sample(atom: OldAtom) -> range | None:
    if atom[0] == "lit":
        return range(atom[1], atom[1] + 1)
    if atom[0] == "range" and atom[2] - atom[1] < _OLD_SAMPLE:
        return range(atom[1], atom[2] + 1)
    if atom[0] == "cat":
        return range(_OLD_SAMPLE)
    return None


@functools.lru_cache(maxsize=1024)
def _old_atoms_overlap(a: OldAtom, b: OldAtom) -> bool:
    if a[0] == "any" or b[0] == "any":
        return True
    sample_a, sample_b = _old_atom_sample(a), _old_atom_sample(b)
    if a[0] != "cat" and sample_a is not None:
        return any(_old_atom_contains(b, cp) for cp in sample_a)
    if b[0] != "cat" and sample_b is not None:
        return any(_old_atom_contains(a, cp) for cp in sample_b)
    if a[0] == "cat" and b[0] == "cat":
        return any(
            _old_atom_contains(a, cp) and _old_atom_contains(b, cp)
            for cp in range(_OLD_SAMPLE)
        )
    return True


def _old_first(seq: Iterable[tuple[Any, Any]]) -> tuple[list[OldAtom], bool]:
    atoms: list[OldAtom] = []
    for op, av in seq:
        item, nullable = _old_first_item(op, av)
        atoms.extend(item)
        if not nullable:
            return atoms, False
    return atoms, True


def _old_first_item(op: Any, av: Any) -> tuple[list[OldAtom], bool]:
    if op is _sre.LITERAL:
        return [("lit", av)], False
    if op is _sre.IN:
        atoms: list[OldAtom] = []
        for sub_op, sub_av in av:
            if sub_op is _sre.LITERAL:
                atoms.append(("lit", sub_av))
            elif sub_op is _sre.RANGE:
                atoms.append(("range", sub_av[0], sub_av[1]))
            elif sub_op is _sre.CATEGORY and str(sub_av) in _OLD_CATEGORY_RE:
                atoms.append(("cat", str(sub_av)))
            else:
                return [_OLD_ANY_ATOM], False
        return atoms, False
    if op is _sre.SUBPATTERN:
        return _old_first(av[-1])
    if op is _sre.ATOMIC_GROUP:
        return _old_first(av)
    if op is _sre.BRANCH:
        atoms = []
        nullable = False
        for alternative in av[1]:
            alt_atoms, alt_nullable = _old_first(alternative)
            atoms.extend(alt_atoms)
            nullable = nullable or alt_nullable
        return atoms, nullable
    if op in _OLD_REPEATS:
        atoms, nullable = _old_first(av[2])
        return atoms, nullable or av[0] == 0
    if op in _OLD_ZERO_WIDTH:
        return [], True
    return [_OLD_ANY_ATOM], op not in (_sre.ANY, _sre.NOT_LITERAL)


def _old_ambiguous(alternatives: Sequence[Any]) -> bool:
    firsts = [_old_first(alternative) for alternative in alternatives]
    for i, (atoms_i, nullable_i) in enumerate(firsts):
        for atoms_j, nullable_j in firsts[i + 1 :]:
            if nullable_i and nullable_j:
                return True
            if any(_old_atoms_overlap(a, b) for a in atoms_i for b in atoms_j):
                return True
    return False


class _OldShape:
    def __init__(self) -> None:
        self.open_quantifiers = 0
        self.choice_points = 0


def _old_walk(seq: Iterable[tuple[Any, Any]], enclosing: int, shape: _OldShape) -> None:
    for op, av in seq:
        if op in _OLD_REPEATS:
            low, high, body = av
            variable = low != high
            unbounded = high == _sre.MAXREPEAT
            shape.open_quantifiers += unbounded
            shape.choice_points += variable
            if enclosing and variable and (unbounded or enclosing > _OLD_SMALL_REPEAT):
                raise PatternError(_OLD_NESTED)
            _old_walk(body, max(enclosing, high if high >= 2 else 0), shape)
        elif op is _sre.BRANCH:
            alternatives = av[1]
            if _old_ambiguous(alternatives):
                if enclosing:
                    raise PatternError(_OLD_ALTERNATION)
                shape.choice_points += 1
            for alternative in alternatives:
                _old_walk(alternative, enclosing, shape)
        elif op is _sre.SUBPATTERN:
            _old_walk(av[-1], enclosing, shape)
        elif op is _sre.ATOMIC_GROUP:
            _old_walk(av, enclosing, shape)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            _old_walk(av[1], enclosing, shape)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise PatternError(
                "backreferences and conditional groups are not supported"
            )


def old_compile_regex(source: str) -> re.Pattern[str]:
    """
    The safety check before this parser: C{compile_regex} on C{re._parser}.
    """
    if not source:
        raise PatternError("empty regular expression")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            tree = _sre_parse.parse(source, re.IGNORECASE)
            compiled = re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise PatternError(f"invalid regular expression: {e}") from None
        except (Warning, RecursionError, OverflowError) as e:
            raise PatternError(f"unusable regular expression: {e}") from None
    shape = _OldShape()
    _old_walk(tree, 0, shape)
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


def verdict(check: Any, source: str) -> str:
    """
    What a safety check says of C{source}: C{accepted} or its refusal.
    """
    try:
        check(source)
    except PatternError as e:
        return str(e)
    return "accepted"


def re_accepts(source: str) -> bool:
    """
    Whether C{re.compile} takes C{source} the way C{compile_regex} asks.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            re.compile(source, re.IGNORECASE)
        except (re.error, Warning, RecursionError, OverflowError):
            return False
    return True


# -- generated expressions -----------------------------------------------------

#: Characters written as themselves, some special in verbose mode or in
#: case folding (the Kelvin sign folds to k, the long s to s).
_LITERALS = list("abkxAZ19_@-,:=!<>}]é ") + ["\u212a", "\u017f", "#", "\n", "\t"]
_ESCAPES = [
    *(rf"\{x}" for x in "dDsSwWntfv\\.*+?()[]{}|^$-# "),
    r"\x41",
    r"\x6b",
    r"\u00e9",
    r"\U0001F600",
    r"\N{EM DASH}",
    r"\N{LATIN SMALL LETTER K}",
    r"\0",
    r"\07",
    r"\012",
    r"\101",
    r"\153",
    "\\\u00e9",
]
_CLASS_CHARS = list("abkxyzAZ019_.@*+?()|{}$^ é\u212a") + [
    r"\]",
    r"\\",
    r"\-",
    r"\[",
    r"\^",
    r"\b",
    r"\n",
    r"\x41",
    r"\101",
    r"\0",
    r"\u017f",
    r"\N{DIGIT ONE}",
]
_CLASS_CATEGORIES = [rf"\{x}" for x in "dDsSwW"]
_RANGE_ENDS = [("0", 48), ("9", 57), ("A", 65), ("Z", 90), ("a", 97), ("k", 107)]
_RANGE_ENDS += [
    ("z", 122),
    ("é", 233),
    (r"\x41", 65),
    (r"\x7a", 122),
    (r"\u212a", 8490),
]
_QUANTIFIERS = ["*", "+", "?", "{0}", "{1}", "{2}", "{3}", "{5}", "{0,1}", "{1,3}"]
_QUANTIFIERS += ["{2,}", "{,3}", "{,}", "{1,5}", "{3,3}", "{0,9}", "{4,}"]
_FAKE_BRACES = ["{", "{}", "{a}", "{1,x}", "{,", "{1", "}"]
_ZERO_WIDTH = ["^", "$", r"\A", r"\Z", r"\b", r"\B", "(?#c)"]
_OPENERS = ["(", "(", "(?:", "(?:", "(?:", "(?P<p>", "(?i:", "(?-i:", "(?s:", "(?x:"]
_OPENERS += ["(?-x:", "(?a:", "(?>", "(?>", "(?=", "(?!", "(?=", "(?!", "(?<=", "(?<!"]
_REFERENCES = [r"\1", r"\1", r"\2", r"\10", "(?P=g)", "(?P=h)"]
_PREFIXES = ["", "", "", "(?x)", "(?i)", "(?ix)", "(?#note)", "(?a)"]


@st.composite
def _range(draw: st.DrawFn) -> str:
    (low, low_code), (high, high_code) = sorted(
        (draw(st.sampled_from(_RANGE_ENDS)), draw(st.sampled_from(_RANGE_ENDS))),
        key=lambda end: end[1],
    )
    return f"{low}-{high}"


@st.composite
def _class(draw: st.DrawFn) -> str:
    members = draw(
        st.lists(
            st.one_of(
                st.sampled_from(_CLASS_CHARS),
                st.sampled_from(_CLASS_CATEGORIES),
                _range(),
            ),
            min_size=0 if draw(st.booleans()) else 1,
            max_size=4,
        )
    )
    lead = draw(st.sampled_from(["", "", "]", "-"]))
    if not members and not lead:
        lead = "]"
    tail = draw(st.sampled_from(["", "", "", "-"]))
    negate = draw(st.sampled_from(["", "", "^"]))
    return f"[{negate}{lead}{''.join(members)}{tail}]"


def _weighted(*choices: tuple[int, st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """
    One of C{choices}, each C{(weight, strategy)} drawn that often.
    """
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


_QUANTIFIED = st.tuples(
    st.sampled_from(["", ""] + _QUANTIFIERS), st.sampled_from(["", "", "", "?", "+"])
).map(lambda q: q[0] + q[1] if q[0] else "")
#: Quantifiers for groups, mostly repeating ones: repeated alternations and
#: repetitions are what the check judges.
_REPEATED = st.sampled_from(["*", "+", "+", "{2}", "{1,3}", "{2,}", "?", "*?", ""])
#: A few overlapping spellings of the same characters, so alternatives
#: often share a first character or a prefix (through C{[a]}, C{(?:a)},
#: C{\x61}, case, or verbose-mode spaces and comments).
_SAME = ["a", "a", "b", "[a]", "[aa]", "(?:a)", r"\x61", "A", "[ab]", "[^b]", " "]
_SAME += [" a", "a ", "#c\n", r"\w", r"\d", "1", "."]
#: Leaves of the grammar: characters, escapes and classes with an optional
#: quantifier; zero-width items, comments and literal braces without one;
#: now and then a backreference (which only some expressions define).
_LEAVES = _weighted(
    (8, st.tuples(st.sampled_from(_LITERALS + _ESCAPES), _QUANTIFIED).map("".join)),
    (8, st.tuples(st.sampled_from(_SAME), _QUANTIFIED).map("".join)),
    (3, st.tuples(_class(), _QUANTIFIED).map("".join)),
    (1, st.tuples(st.just("."), _QUANTIFIED).map("".join)),
    (2, st.sampled_from(_ZERO_WIDTH + _FAKE_BRACES)),
    (1, st.sampled_from(_REFERENCES)),
)


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    sequence = st.lists(inner, min_size=0, max_size=4).map("".join)
    alternation = st.lists(sequence, min_size=1, max_size=3).map("|".join)
    group = st.builds(
        lambda opener, body, quantifier: f"{opener}{body}){quantifier}",
        st.sampled_from(_OPENERS),
        alternation,
        _QUANTIFIED,
    )
    # Alternatives that start alike, repeated: where shared prefixes, single
    # characters and spellings decide between accepted and refused.
    alike = st.builds(
        lambda opener, head, tails, quantifier: (
            f"{opener}{'|'.join(head + tail for tail in tails)}){quantifier}"
        ),
        st.sampled_from(_OPENERS),
        st.one_of(st.sampled_from(_SAME + [r"\1", "(?P=g)"]), inner),
        st.lists(st.one_of(st.sampled_from(_SAME), sequence), min_size=2, max_size=3),
        _REPEATED,
    )
    conditional = st.builds(
        lambda test, yes, no: f"(?({test}){yes}{no})",
        st.sampled_from(["1", "1", "g"]),
        sequence,
        st.one_of(st.just(""), sequence.map("|".__add__)),
    )
    return _weighted((5, group), (4, alike), (2, sequence), (1, conditional))


_PIECES = st.recursive(_LEAVES, _extend, max_leaves=16)
#: Regular expressions built from the grammar, with every kind of group,
#: escape, class and quantifier, nested; half of them first define the
#: groups that backreferences and conditionals refer to.
REGEXES = st.builds(
    lambda prefix, groups, alternatives: prefix + groups + "|".join(alternatives),
    st.sampled_from(_PREFIXES),
    st.sampled_from(["", "(x)(?P<g>y)(?P<h>z)"]),
    st.lists(st.lists(_PIECES, max_size=4).map("".join), min_size=1, max_size=3),
)

#: Pieces of syntax thrown together without a grammar: most are invalid,
#: the valid ones are corner cases nobody would write on purpose.
_SOUP_TOKENS = [
    *"ab()|*+?{},0129[]^-\\.$# \n:=!<>P",
    "(?:",
    "(?P<n>",
    "(?P=n)",
    "(?=",
    "(?<=",
    "(?>",
    "(?#",
    "(?i)",
    "(?x)",
    "(?i:",
    "(?-x:",
    "(?(1)",
    "(?(n)",
    r"\d",
    r"\b",
    r"\1",
    r"\0",
    r"\x4",
    r"\u00e",
    r"\N{EM DASH}",
    "{1,2}",
    "{,}",
]
SOUP = st.one_of(
    st.lists(st.sampled_from(_SOUP_TOKENS), max_size=14).map("".join),
    st.text(st.sampled_from("ab()[]{}|*+?^$.\\-,:=!<>#Px0129 \n"), max_size=16),
)


def describe(source: str) -> str:
    """
    A label for the statistics C{pytest --hypothesis-show-statistics} shows.
    """
    result = verdict(compile_regex, source)
    return result if result == "accepted" else result.split(":")[0].split(" (")[0]


class OracleTests(SynchronousTestCase):
    """
    The new safety check gives the verdicts the C{re._parser} one gave.
    """

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(REGEXES)
    def test_grammar_same_verdict(self, source: str) -> None:
        """
        For expressions from the grammar (nested groups of every kind,
        alternations, quantifiers, classes, escapes, verbose mode), the
        check accepts exactly what the old one accepted and refuses the rest
        with the same message.
        """
        event(describe(source))
        self.assertEqual(
            verdict(compile_regex, source), verdict(old_compile_regex, source)
        )

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(SOUP)
    def test_soup_same_verdict(self, source: str) -> None:
        """
        For random strings of regular-expression syntax, valid or not, the
        verdicts agree too.
        """
        event(describe(source))
        self.assertEqual(
            verdict(compile_regex, source), verdict(old_compile_regex, source)
        )

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.one_of(SOUP, REGEXES))
    def test_parser_reads_what_re_accepts(self, source: str) -> None:
        """
        Whatever C{re.compile} accepts, the parser reads without raising
        (neither a L{PatternError} for syntax it does not know, nor any other
        exception); what it refuses, the parser refuses with L{PatternError}
        or reads anyway, never with another exception.
        """
        accepted = re_accepts(source)
        event("accepted by re" if accepted else "refused by re")
        try:
            tree = parse_regex(source)
        except PatternError as e:
            self.assertFalse(accepted, f"{source!r} not understood: {e}")
        else:
            self.assertIsInstance(tree, tuple)

    def test_normalisations_decide(self) -> None:
        """
        The engine's normalisations the parser follows decide these
        verdicts; both checks agree on each.
        """
        nested = "repeated alternation"
        cases = {
            "(ab|ac)+": "accepted",  # shared prefix moved out
            "a(aa|a)*": "accepted",  # ... leaving a|(empty)
            "((?:a)a|(?:a)A)*": "accepted",  # plain groups spliced
            "(a|[ab])*": "accepted",  # single characters as one class
            "(?:[a]b|ac)+": "accepted",  # [a] is a
            "(?:a|\\x61b)+": "accepted",  # \x61 is a
            "(?:.a|.b)*": "accepted",  # . shared
            "(?x)(?:a| a)*": nested,  # verbose: " a" is a
            "(?x)(?:a|#c\n a)+": nested,  # verbose comment
            "(?:a|ab?)+": nested,
            "(x)(?:\\1a|\\1b)*": "backreferences",  # \1 shared, seen first
        }
        for source, expected in cases.items():
            with self.subTest(source=source):
                self.assertTrue(verdict(compile_regex, source).startswith(expected))
                self.assertTrue(verdict(old_compile_regex, source).startswith(expected))

    def test_oracle_refuses(self) -> None:
        """
        The oracle is the old check: it refuses what the old tests refused
        (so agreeing with it is not agreeing with something that accepts
        everything).
        """
        self.assertIn("nested", verdict(old_compile_regex, "(a+)+"))
        self.assertIn("alternation", verdict(old_compile_regex, "(a|ab?)+"))
        self.assertIn("backreferences", verdict(old_compile_regex, r"(a)\1"))
        self.assertEqual(verdict(old_compile_regex, "(ab|ac)+"), "accepted")


# -- the parser, piece by piece ------------------------------------------------


class ParseTests(SynchronousTestCase):
    """
    Each piece of syntax reads into the node that says what it matches.
    """

    def assertShape(self, source: str, *nodes: Any) -> None:
        self.assertEqual(parse_regex(source), tuple(nodes), source)

    def test_characters(self) -> None:
        """
        Plain characters are L{Char}s; C{]} and C{}} outside a class too.
        """
        self.assertShape("aé]}", c("a"), c("é"), c("]"), c("}"))

    def test_code_escapes(self) -> None:
        """
        Hex, Unicode, named and simple escapes give their code points.
        """
        self.assertShape(
            r"\x41\u00e9\U0001F600\N{EM DASH}\n\t\a\f\v\r\\",
            *map(Char, (0x41, 0xE9, 0x1F600, 0x2014, 10, 9, 7, 12, 11, 13, 92)),
        )

    def test_punctuation_escapes(self) -> None:
        """
        A backslash before a character that is not an ASCII letter or digit
        makes it literal, non-ASCII letters included.
        """
        self.assertShape(r"\.\*\(\[\ \é", *map(c, ".*([ é"))

    def test_octal(self) -> None:
        """
        C{\\0} and up to two more octal digits, and three octal digits, are
        octal escapes; C{\\08} is C{\\0} then C{8}.
        """
        self.assertShape(r"\0\07\012\101\08", *map(Char, (0, 7, 10, 65, 0, 56)))

    def test_backreferences(self) -> None:
        """
        C{\\1} to C{\\99} and C{(?P=name)} are backreferences by number;
        C{\\18} is group 18 (8 is not octal), C{\\1} then a letter is group 1.
        """
        groups = "(a)" * 18
        tree = parse_regex(groups + r"\18\1b(?P<n>x)(?P=n)")
        self.assertEqual(tree[18:21], (Backref(18), Backref(1), c("b")))
        self.assertEqual(tree[22], Backref(19))

    def test_categories_and_anchors(self) -> None:
        """
        C{\\d}-style escapes are one-member classes; C{^ $ \\A \\Z \\b \\B}
        are anchors (C{\\z}, which Python 3.14 accepts, is C{\\Z}); C{.} is
        any character.
        """
        self.assertShape(
            r"\d\W^$\A\Z\b\B.",
            klass(Category("digit")),
            klass(Category("not_word")),
            *(Anchor(kind) for kind in ("^", "$", r"\A", r"\Z", r"\b", r"\B")),
            AnyChar(),
        )
        self.assertShape(r"\z", Anchor(r"\Z"))

    def test_classes(self) -> None:
        """
        Classes hold characters, ranges and categories, duplicates removed;
        C{\\b} in a class is a backspace.
        """
        self.assertShape(
            r"[a-z\d_\b.\d_]",
            klass(CharRange(97, 122), Category("digit"), c("_"), Char(8), c(".")),
        )

    def test_class_edges(self) -> None:
        """
        C{]} first (after an optional C{^}) and C{-} first or last are
        literal.
        """
        self.assertShape("[]a]", klass(c("]"), c("a")))
        self.assertShape("[^]a]", klass(c("]"), c("a"), negated=True))
        self.assertShape("[a-]", klass(c("a"), c("-")))
        self.assertShape("[-a]", klass(c("-"), c("a")))
        self.assertShape(r"[\d-]", klass(Category("digit"), c("-")))
        self.assertShape("[]-a]", klass(CharRange(93, 97)))

    def test_class_escapes(self) -> None:
        """
        Escapes in a class: hex, octal, named, and escaped punctuation.
        """
        self.assertShape(
            r"[\x41\101\0\N{EM DASH}\]\\\-]",
            klass(*map(Char, (65, 0, 0x2014, 93, 92, 45))),
        )

    def test_single_character_class(self) -> None:
        """
        A class of one character is that character; negated, it stays a
        class.
        """
        self.assertShape("[a][aa]", c("a"), c("a"))
        self.assertShape("[^a]", klass(c("a"), negated=True))

    def test_quantifiers(self) -> None:
        """
        Every quantifier form, greedy, lazy and possessive.
        """
        a = (c("a"),)
        cases = {
            "a*": Repeat(a, 0, None),
            "a+?": Repeat(a, 1, None, "lazy"),
            "a?+": Repeat(a, 0, 1, "possessive"),
            "a{2}": Repeat(a, 2, 2),
            "a{2,}": Repeat(a, 2, None),
            "a{,3}": Repeat(a, 0, 3),
            "a{1,3}?": Repeat(a, 1, 3, "lazy"),
            "a{,}+": Repeat(a, 0, None, "possessive"),
            "a{0}": Repeat(a, 0, 0),
        }
        for source, node in cases.items():
            with self.subTest(source=source):
                self.assertShape(source, node)

    def test_literal_braces(self) -> None:
        """
        A C{{} that does not open a valid quantifier is a literal, and what
        follows it is read normally.
        """
        self.assertShape("a{}", c("a"), c("{"), c("}"))
        self.assertShape("a{1,x}", *map(c, "a{1,x}"))
        self.assertShape("{1", c("{"), c("1"))

    def test_groups(self) -> None:
        """
        Capturing, named, flag, atomic and lookaround groups are nodes;
        groups are numbered in the order they open.
        """
        self.assertShape(
            "(a(?P<n>b))(?i:c)(?-i:d)(?>e)(?=f)(?!g)(?<=h)(?<!i)",
            Group((c("a"), Group((c("b"),), 2, "n")), 1),
            Group((c("c"),), flags_on="i"),
            Group((c("d"),), flags_off="i"),
            Atomic((c("e"),)),
            Lookaround((c("f"),)),
            Lookaround((c("g"),), negative=True),
            Lookaround((c("h"),), behind=True),
            Lookaround((c("i"),), behind=True, negative=True),
        )

    def test_plain_groups_spliced(self) -> None:
        """
        A plain C{(?:...)} leaves no node; quantified, its contents are the
        body; comments and global flags leave nothing.
        """
        self.assertShape("(?i)(?:ab)c(?#x)", c("a"), c("b"), c("c"))
        self.assertShape("(?:ab)*", Repeat((c("a"), c("b")), 0, None))
        self.assertShape("(?:)d", c("d"))

    def test_conditional(self) -> None:
        """
        C{(?(1)yes|no)} and C{(?(name)yes)} are conditionals by group
        number.
        """
        self.assertShape(
            "(?P<n>a)(?(1)b|c)(?(n)d)",
            Group((c("a"),), 1, "n"),
            Conditional(1, (c("b"),), (c("c"),)),
            Conditional(1, (c("d"),), None),
        )

    def test_alternation_prefix(self) -> None:
        """
        Leading characters shared by all alternatives move in front, and
        single-character alternatives become a class.
        """
        self.assertShape("ab|ac", c("a"), klass(c("b"), c("c")))
        self.assertShape(
            r"a|[bc]|\d|a", klass(c("a"), c("b"), c("c"), Category("digit"))
        )
        self.assertShape("ab|cd", Branch(((c("a"), c("b")), (c("c"), c("d")))))
        self.assertShape("a|ab", c("a"), Branch(((), (c("b"),))))
        self.assertShape("(?:x)a|(?:x)b", c("x"), klass(c("a"), c("b")))

    def test_groups_never_shared(self) -> None:
        """
        Alternatives starting with equal groups or repetitions keep them:
        the engine does not merge them either.
        """
        tree = parse_regex("(?i:x)a|(?i:x)b")
        self.assertIsInstance(tree[0], Branch)
        tree = parse_regex("x*a|x*b")
        self.assertIsInstance(tree[0], Branch)

    def test_verbose(self) -> None:
        """
        After a leading C{(?x)}, white space and C{#} comments are skipped,
        in every alternative, but not in classes or after a backslash.
        """
        self.assertShape(
            "(?x) a b # comment | ignored\n c [ ] \\ |d",
            Branch(((c("a"), c("b"), c("c"), c(" "), c(" ")), (c("d"),))),
        )

    def test_verbose_scoped(self) -> None:
        """
        C{(?x:...)} is verbose inside only; C{(?-x:...)} turns it off.
        """
        self.assertShape(
            "a (?x: b )",
            c("a"),
            c(" "),
            Group((c("b"),), flags_on="x"),
        )
        self.assertShape(
            "(?x)a(?-x: b)",
            c("a"),
            Group((c(" "), c("b")), flags_off="x"),
        )

    def test_verbose_comment_escaped_newline(self) -> None:
        """
        A backslash-newline does not end a verbose comment.
        """
        self.assertShape("(?x)a#x\\\nb\nc", c("a"), c("c"))

    def test_quantifier_skips_comments(self) -> None:
        """
        A quantifier after a comment repeats the item before the comment.
        """
        self.assertShape("a(?#c)*", Repeat((c("a"),), 0, None))

    def test_not_understood(self) -> None:
        """
        What C{re.compile} refuses, the parser refuses with a
        L{PatternError} that says where, rather than guess a shape.
        """
        for source in ("a**", "(a", "a)", r"\q", "[a", "(?<n>a)", "a|*", r"\2(a)"):
            with self.subTest(source=source):
                with self.assertRaises(PatternError) as caught:
                    parse_regex(source)
                self.assertIn("not understood at position", str(caught.exception))


class CheckTests(SynchronousTestCase):
    """
    The safety check on the new tree refuses what needs refusing.
    """

    def test_backreferences_refused(self) -> None:
        """
        Named backreferences and conditionals are refused like C{\\1}.
        """
        for source in ("(?P<n>a)(?P=n)", "(a)(?(1)b|c)", "(?P<n>a)(?(n)b)"):
            with self.subTest(source=source):
                with self.assertRaises(PatternError) as caught:
                    compile_regex(source)
                self.assertIn("backreferences", str(caught.exception))

    def test_factored_alternation_accepted(self) -> None:
        """
        A repeated alternation is judged after shared prefixes move out:
        C{(ab|ac)+} is C{(a[bc])+}, safe.
        """
        self.assertEqual(compile_regex("(ab|ac)+").pattern, "(ab|ac)+")
        self.assertEqual(compile_regex("(?:xa|xb)+z").pattern, "(?:xa|xb)+z")

    def test_deep_nesting(self) -> None:
        """
        Nesting as deep as C{re.compile} allows is read (the parser does not
        recurse); deeper is refused as unusable, not a traceback.
        """
        deep = "(" * 300 + "a" + ")" * 300
        self.assertEqual(compile_regex(deep).pattern, deep)
        deeper = "(" * 2000 + "a" + ")" * 2000
        with self.assertRaises(PatternError) as caught:
            compile_regex(deeper)
        self.assertIn("unusable regular expression", str(caught.exception))
        tree = parse_regex(deeper)
        self.assertIsInstance(tree[0], Group)


class PrivateInternalsTests(SynchronousTestCase):
    """
    The package does not use CPython's private regular-expression modules.
    """

    def test_no_private_re_imports(self) -> None:
        """
        No module of the package imports C{re._parser}, C{re._constants},
        C{re._compiler} or their old C{sre_*} names.
        """
        private = []
        for path in sorted(PACKAGE.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                    if node.module == "re":
                        names += [f"re.{alias.name}" for alias in node.names]
                for name in names:
                    if name.startswith(("re._", "sre_", "_sre")):
                        private.append(f"{path.relative_to(PACKAGE)}: {name}")
        self.assertEqual(private, [])
        self.assertFalse(hasattr(patterns, "_sre_parse"))
