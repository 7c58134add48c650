"""
Tests for L{mdgateway.policy.patterns}: sender and recipient patterns of rules.
"""

from __future__ import annotations

import fnmatch
import re
import string

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.policy.patterns import (
    ANY_ADDRESS,
    MAX_PATTERN_LENGTH,
    MAX_REGEX_SUBJECT,
    AddressFilter,
    compile_glob,
    compile_regex,
    normalize_address,
    normalize_domain,
    parse_pattern,
)
from mdgateway.policy.regexshape import PatternError

_LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_DOMAIN = st.lists(_LABEL, min_size=2, max_size=4).map(".".join)
_LOCAL = st.text(string.ascii_letters + string.digits + ".-_+", min_size=1, max_size=20)
_ADDRESS = st.tuples(_LOCAL, _DOMAIN).map("@".join)


class NormalizeTests(SynchronousTestCase):
    """
    Addresses are compared in one normal form.
    """

    def test_null(self) -> None:
        """
        The empty string is the null reverse-path: empty text, no domain.
        """
        normal = normalize_address("")
        self.assertEqual((normal.text, normal.domain), ("", None))

    def test_case_folded(self) -> None:
        """
        Local part and domain are case-folded.
        """
        normal = normalize_address("Alice.Smith@Example.COM")
        self.assertEqual(normal.text, "alice.smith@example.com")
        self.assertEqual(normal.domain, "example.com")

    def test_no_domain(self) -> None:
        """
        An address without C{@} (C{<Postmaster>}) has no domain.
        """
        normal = normalize_address("Postmaster")
        self.assertEqual((normal.text, normal.domain), ("postmaster", None))

    def test_idna(self) -> None:
        """
        A domain's A-label and U-label forms normalise to the same text.
        """
        self.assertEqual(
            normalize_domain("XN--BCHER-KVA.Example"),
            normalize_domain("Bücher.example"),
        )

    def test_bad_punycode_kept(self) -> None:
        """
        A label that looks like an A-label but does not decode is kept as is.
        """
        self.assertEqual(normalize_domain("xn--\u00ff.example"), "xn--\u00ff.example")

    def test_quoted_local_part_with_at(self) -> None:
        """
        The domain is what follows the last C{@}.
        """
        self.assertEqual(normalize_address('"a@b"@Example.org').domain, "example.org")


class PatternKindTests(SynchronousTestCase):
    """
    Each pattern form parses to its kind and matches what it says.
    """

    def test_domain(self) -> None:
        """
        A bare domain matches addresses at exactly that domain.
        """
        pattern = parse_pattern("example.com")
        self.assertEqual(pattern.kind, "domain")
        self.assertTrue(pattern.matches("bob@example.com"))
        self.assertFalse(pattern.matches("bob@mail.example.com"))
        self.assertFalse(pattern.matches("bob@example.com.evil.net"))
        self.assertFalse(pattern.matches(""))
        self.assertFalse(pattern.matches("postmaster"))

    def test_subdomains(self) -> None:
        """
        C{*.example.com} matches subdomains at any depth, not the domain.
        """
        pattern = parse_pattern("*.example.com")
        self.assertEqual(pattern.kind, "subdomains")
        self.assertTrue(pattern.matches("a@mail.example.com"))
        self.assertTrue(pattern.matches("a@x.y.example.com"))
        self.assertFalse(pattern.matches("a@example.com"))
        self.assertFalse(pattern.matches("a@badexample.com"))

    def test_address(self) -> None:
        """
        An address matches that address only, ignoring case.
        """
        pattern = parse_pattern("Alice@Example.com")
        self.assertEqual(pattern.kind, "address")
        self.assertTrue(pattern.matches("alice@example.COM"))
        self.assertFalse(pattern.matches("alice2@example.com"))

    def test_address_glob(self) -> None:
        """
        A glob with C{@} is matched against the whole address.
        """
        pattern = parse_pattern("bounce-*@*")
        self.assertEqual(pattern.kind, "address_glob")
        self.assertTrue(pattern.matches("bounce-123@lists.example.org"))
        self.assertTrue(pattern.matches("BOUNCE-@x"))
        self.assertFalse(pattern.matches("xbounce-1@example.org"))

    def test_question_mark(self) -> None:
        """
        C{?} matches exactly one character.
        """
        pattern = parse_pattern("user?@example.com")
        self.assertTrue(pattern.matches("user1@example.com"))
        self.assertFalse(pattern.matches("user@example.com"))
        self.assertFalse(pattern.matches("user12@example.com"))

    def test_domain_glob(self) -> None:
        """
        A glob without C{@} is matched against the domain only.
        """
        pattern = parse_pattern("mail?.example.*")
        self.assertEqual(pattern.kind, "domain_glob")
        self.assertTrue(pattern.matches("x@mail1.example.net"))
        self.assertFalse(pattern.matches("mail1.example.net@other.org"))

    def test_regex_fullmatch(self) -> None:
        """
        C{re:} patterns must match the whole address, case-insensitively.
        """
        pattern = parse_pattern(r"re:bounce-\d+@example\.com")
        self.assertEqual(pattern.kind, "regex")
        self.assertTrue(pattern.matches("Bounce-42@EXAMPLE.com"))
        self.assertFalse(pattern.matches("bounce-42@example.com.evil.net"))
        self.assertFalse(pattern.matches("xbounce-42@example.com"))

    def test_regex_case_sensitive_scope(self) -> None:
        """
        An inline C{(?-i:...)} group makes part of a regex case-sensitive,
        against the case-folded address.
        """
        pattern = parse_pattern(r"re:(?-i:alice)@example\.com")
        self.assertTrue(pattern.matches("ALICE@example.com"))
        self.assertFalse(parse_pattern(r"re:(?-i:Alice)@.*").matches("alice@x"))

    def test_regex_subject_cap(self) -> None:
        """
        Addresses longer than L{MAX_REGEX_SUBJECT} never match a regex.
        """
        pattern = parse_pattern("re:.*")
        self.assertTrue(pattern.matches("a" * MAX_REGEX_SUBJECT))
        self.assertFalse(pattern.matches("a" * (MAX_REGEX_SUBJECT + 1)))

    def test_null(self) -> None:
        """
        C{<>} matches the null reverse-path only.
        """
        pattern = parse_pattern("<>")
        self.assertTrue(pattern.matches(""))
        self.assertFalse(pattern.matches("a@example.com"))

    def test_star(self) -> None:
        """
        C{*} matches everything, the null reverse-path included.
        """
        pattern = parse_pattern("*")
        self.assertEqual(pattern.kind, "any")
        self.assertTrue(pattern.matches(""))
        self.assertTrue(pattern.matches("postmaster"))

    def test_star_at_star(self) -> None:
        """
        C{*@*} matches any address with a domain but not the null sender.
        """
        pattern = parse_pattern("*@*")
        self.assertTrue(pattern.matches("a@b"))
        self.assertFalse(pattern.matches(""))

    def test_idna_pattern(self) -> None:
        """
        A domain pattern in either IDNA form matches addresses in either.
        """
        self.assertTrue(
            parse_pattern("bücher.example").matches("a@xn--bcher-kva.example")
        )
        self.assertTrue(
            parse_pattern("xn--bcher-kva.example").matches("a@BÜCHER.example")
        )
        self.assertTrue(
            parse_pattern("*.bücher.example").matches("a@x.xn--bcher-kva.example")
        )

    def test_domain_literal(self) -> None:
        """
        An address literal domain is an exact domain.
        """
        self.assertTrue(parse_pattern("[192.0.2.1]").matches("a@[192.0.2.1]"))


class PatternErrorTests(SynchronousTestCase):
    """
    Malformed patterns are refused with a message that says why.
    """

    def assertRefused(self, text: str, fragment: str) -> None:
        with self.assertRaises(PatternError) as caught:
            parse_pattern(text)
        self.assertIn(fragment, str(caught.exception))

    def test_empty(self) -> None:
        """
        An empty pattern is refused.
        """
        self.assertRefused("", "empty pattern")

    def test_too_long(self) -> None:
        """
        Patterns longer than L{MAX_PATTERN_LENGTH} are refused.
        """
        self.assertRefused("a" * (MAX_PATTERN_LENGTH + 1), "longer than")
        self.assertRefused("re:" + "a" * MAX_PATTERN_LENGTH, "longer than")

    def test_whitespace(self) -> None:
        """
        White space is refused outside regular expressions.
        """
        self.assertRefused("example .com", "white space")
        self.assertRefused(" example.com", "white space")

    def test_angle_brackets(self) -> None:
        """
        Addresses are written without angle brackets.
        """
        self.assertRefused("<a@example.com>", "angle brackets")

    def test_leading_dot(self) -> None:
        """
        The Postfix-style C{.example.com} gets a hint to write C{*.example.com}.
        """
        self.assertRefused(".example.com", "'*.example.com'")

    def test_empty_local_or_domain(self) -> None:
        """
        An C{@} needs something on both sides.
        """
        self.assertRefused("@example.com", "not an address")
        self.assertRefused("alice@", "not an address")
        self.assertRefused("*@", "not an address")

    def test_bad_domain(self) -> None:
        """
        Empty labels, a trailing dot and special characters are refused.
        """
        self.assertRefused("example..com", "empty label")
        self.assertRefused("example.com.", "dot")
        self.assertRefused("exa(mple).com", "not a domain")

    def test_invalid_regex(self) -> None:
        """
        A regular expression that does not compile is refused.
        """
        self.assertRefused("re:(abc", "invalid regular expression")
        self.assertRefused("re:", "empty regular expression")

    def test_nested_quantifiers(self) -> None:
        """
        Nested quantifiers are refused as exponential.
        """
        for source in ("(a+)+", "(.*)*", "(a*b*)*", r"([a-z]+\.)+com", "(a?){8}"):
            with self.subTest(source=source):
                self.assertRefused("re:" + source, "nested quantifiers")

    def test_ambiguous_alternation(self) -> None:
        """
        Repeated alternations whose branches overlap are refused.
        """
        for source in ("(a|a)*", "(a|ab?)+", r"(\d|1x)+", "(?:x|[a-z]y)*", "(A|ay)+"):
            with self.subTest(source=source):
                self.assertRefused("re:" + source, "repeated alternation")

    def test_backreference(self) -> None:
        """
        Backreferences are refused.
        """
        self.assertRefused(r"re:(a)\1", "backreferences")

    def test_too_many_open_quantifiers(self) -> None:
        """
        More than three open-ended quantifiers are refused.
        """
        self.assertRefused("re:.*a.*b.*c.*", "open-ended")

    def test_too_many_choice_points(self) -> None:
        """
        More than ten optional parts are refused.
        """
        self.assertRefused("re:" + "a?" * 11, "optional or variable-length")

    def test_warning_is_refusal(self) -> None:
        """
        A regex Python warns about (a possible nested set) is refused.
        """
        self.assertRefused("re:[[a]", "unusable regular expression")


class SafeRegexTests(SynchronousTestCase):
    """
    Useful regular expressions are not caught by the safety check.
    """

    def test_accepted(self) -> None:
        """
        Common, safe shapes compile.
        """
        for source in (
            r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}",
            r"bounce-.*@.*",
            r".*@\[(\d{1,3}\.){3}\d{1,3}\]",
            r"(com|net|org)+",
            r"(?:x\w|\dy)+",
            r"(a|ab)*",
            r"(?=.*@)[^@]+@example\.com",
        ):
            with self.subTest(source=source):
                self.assertTrue(compile_regex(source).pattern == source)

    @given(st.sampled_from(["a", ".", r"\w", "[a-z]", "(?:ab)"]), st.sampled_from("*+"))
    def test_nested_always_refused(self, atom: str, inner: str) -> None:
        """
        Any atom repeated inside a repetition is refused.
        """
        with self.assertRaises(PatternError):
            compile_regex(f"(?:{atom}{inner})+")


class GlobTests(SynchronousTestCase):
    """
    The glob compiler agrees with C{fnmatch} and is linear.
    """

    @given(
        st.text("ab*?", max_size=8),
        st.text("ab", max_size=10),
    )
    def test_like_fnmatch(self, glob: str, text: str) -> None:
        """
        Without brackets, a glob matches exactly what C{fnmatchcase} does.
        """
        self.assertEqual(
            compile_glob(glob).fullmatch(text) is not None,
            fnmatch.fnmatchcase(text, glob),
        )

    def test_brackets_literal(self) -> None:
        """
        Brackets and other regex characters are literal in globs.
        """
        self.assertIsNotNone(compile_glob("[a].b*").fullmatch("[a].bcd"))
        self.assertIsNone(compile_glob("[a].b*").fullmatch("a.bcd"))

    def test_many_stars_fast(self) -> None:
        """
        A glob with many stars against a long non-matching text completes
        (the naive translation backtracks polynomially).
        """
        glob = compile_glob("*a" * 12 + "*b")
        self.assertIsNone(glob.fullmatch("a" * 300))


class PatternPropertyTests(SynchronousTestCase):
    """
    Properties every address has against its own patterns.
    """

    @given(_ADDRESS)
    def test_own_exact_pattern(self, address: str) -> None:
        """
        An address matches the pattern that is the address itself.
        """
        self.assertTrue(parse_pattern(address).matches(address))

    @given(_ADDRESS)
    def test_own_domain(self, address: str) -> None:
        """
        An address matches its domain, C{*@domain} and the subdomains
        pattern of its parent domain.
        """
        domain = address.rpartition("@")[2]
        self.assertTrue(parse_pattern(domain).matches(address))
        self.assertTrue(parse_pattern("*@" + domain).matches(address))
        parent = domain.partition(".")[2]
        if "." in parent:
            self.assertTrue(parse_pattern("*." + parent).matches(address))
        self.assertFalse(parse_pattern("*." + domain).matches(address))

    @given(st.one_of(_ADDRESS, st.just(""), _LOCAL))
    def test_star_matches_everything(self, address: str) -> None:
        """
        C{*} matches every address, and so does an empty filter.
        """
        self.assertTrue(parse_pattern("*").matches(address))
        self.assertTrue(ANY_ADDRESS.matches(address))

    @given(_ADDRESS)
    def test_case_insensitive(self, address: str) -> None:
        """
        Case never matters, in the pattern or the address, for every form.
        """
        domain = address.rpartition("@")[2]
        for pattern in (address, domain, "*@" + domain):
            self.assertTrue(parse_pattern(pattern.swapcase()).matches(address))
            self.assertTrue(parse_pattern(pattern).matches(address.swapcase()))
        regex = parse_pattern("re:" + re.escape(address.swapcase()))
        self.assertTrue(regex.matches(address))

    @given(_ADDRESS, _DOMAIN)
    def test_other_domain(self, address: str, other: str) -> None:
        """
        An address does not match a domain pattern of another domain.
        """
        domain = address.rpartition("@")[2]
        if other != domain:
            self.assertFalse(parse_pattern(other).matches(address))

    @given(_ADDRESS)
    def test_null_only_matches_null(self, address: str) -> None:
        """
        C{<>} matches no real address.
        """
        self.assertFalse(parse_pattern("<>").matches(address))


class FilterTests(SynchronousTestCase):
    """
    L{AddressFilter} combines patterns with "any of".
    """

    def test_any_of(self) -> None:
        """
        An address matches when any pattern does.
        """
        selected = AddressFilter.of(
            "example.com", "*.example.org", "ceo@example.net", "re:bounce-.*@.*", "<>"
        )
        self.assertTrue(selected.matches("x@EXAMPLE.com"))
        self.assertTrue(selected.matches("x@a.b.example.org"))
        self.assertTrue(selected.matches("CEO@example.net"))
        self.assertTrue(selected.matches("bounce-1@lists.example"))
        self.assertTrue(selected.matches(""))
        self.assertFalse(selected.matches("x@example.org"))
        self.assertFalse(selected.matches("cfo@example.net"))
        self.assertEqual(selected.texts[0], "example.com")
        self.assertFalse(selected.anything)

    def test_empty_matches_all(self) -> None:
        """
        A filter without patterns matches everything.
        """
        self.assertTrue(AddressFilter().anything)
        self.assertTrue(AddressFilter().matches("anyone@anywhere"))

    def test_of_raises(self) -> None:
        """
        L{AddressFilter.of} raises L{PatternError} for a bad pattern.
        """
        self.assertRaises(PatternError, AddressFilter.of, "re:(a+)+")

    def test_open_ended(self) -> None:
        """
        Filters that take mail for arbitrary domains are open-ended; lists of
        real domains are not.
        """
        for texts in (["*"], ["*@*"], ["*.com"], ["re:.*@.*"], ["example.com", "*"]):
            with self.subTest(texts=texts):
                self.assertTrue(AddressFilter.of(*texts).open_ended())
        self.assertTrue(AddressFilter().open_ended())
        for texts in (["example.com", "*.example.com"], ["postmaster@example.com"]):
            with self.subTest(texts=texts):
                self.assertFalse(AddressFilter.of(*texts).open_ended())

    def test_equality(self) -> None:
        """
        Filters built from the same patterns are equal (rules compare).
        """
        self.assertEqual(AddressFilter.of("a.example"), AddressFilter.of("a.example"))
