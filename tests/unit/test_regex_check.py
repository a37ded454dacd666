"""Unit tests for ``qwen_serve.gateway.regex_check``: the RE2 wrapper that checks guided regexes and schema
patterns in linear time, with the engine's Unicode classes."""

from __future__ import annotations

import re
import time

import pytest

from qwen_serve.gateway import regex_check
from qwen_serve.gateway.regex_check import (
    MAX_REPEAT,
    RegexSyntaxError,
    RegexTooComplex,
    compile_regex,
    repetition_problem,
)

REDOS = r"(a?){28}a{28}c"  # exponential for a backtracking engine: Python's re needs ~10 s for 60 characters


def full(pattern: str, text: str) -> bool:
    return compile_regex(pattern).fullmatch(text.encode())


def search(pattern: str, text: str) -> bool:
    return compile_regex(pattern).search(text.encode())


# -- linear time -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [REDOS, r"(a|a)*b", r"(a+)+b", r"(\w+\s?)*x", r"^(a|aa)*c$"])
def test_catastrophic_backtracking_patterns_are_matched_in_linear_time(pattern: str) -> None:
    compiled = compile_regex(pattern)
    for n in (60, 10_000):
        text = ("a" * n).encode()
        t0 = time.perf_counter()
        assert not compiled.fullmatch(text)
        assert time.perf_counter() - t0 < 0.1, (pattern, n)  # Python's re: seconds at n=30, forever at 10 000


def test_the_redos_pattern_still_matches_what_it_should() -> None:
    assert full(REDOS, "a" * 28 + "c") and full(REDOS, "a" * 56 + "c")
    assert not full(REDOS, "a" * 60) and not full(REDOS, "a" * 57 + "c")


def test_fullmatch_is_anchored_and_search_is_not() -> None:
    assert full(r"\d{3}-[a-z]+", "123-abc") and not full(r"\d{3}-[a-z]+", "123-abc!")
    assert search("b+", "abbc") and not full("b+", "abbc")
    assert search("^a", "ab") and not search("^b", "ab")  # JSON Schema pattern: an unanchored search


def test_cost_is_bytes_times_program_size() -> None:
    compiled = compile_regex("[a-z]{10}")
    assert compiled.program_size > 10
    assert compiled.cost(b"x" * 99) == 100 * compiled.program_size


# -- Unicode semantics (the engine's, not RE2's ASCII ones) --------------------------------------


@pytest.mark.parametrize(("pattern", "text", "expected"), [
    (r"\d", "7", True), (r"\d", "\u0663", True),  # ARABIC-INDIC DIGIT THREE
    (r"\d", "\U00010d41", True),  # a Garay digit (Unicode 16): \d in the engine, not in RE2's or Python 3.11's tables
    (r"\d", "x", False), (r"\D", "\u0663", False), (r"\D", "x", True), (r"\D", "\n", True),
    (r"\w+", "héllo_wörld", True), (r"\w", "-", False), (r"\W", "é", False), (r"\W", " ", True),
    (r"\s", "\u3000", True), (r"\s", "\t", True), (r"\s", "\x1c", False),  # White_Space, as Rust's \s (not str.isspace)
    (r"\S", "\u3000", False),
    (r"[\d.]+", "\u0663.5", True), (r"[^\d]", "\u0663", False), (r"[^\W\d_]+", "héllo", True),
    (r"[^\W\d_]+", "h1", False), (r"[\W]", "é", False), (r"[\S]", " ", False), (r"[^\s]", "x", True),
    (r"\p{Greek}+", "αβγ", True), (r"\p{Greek}", "a", False), (r"\P{Greek}", "a", True), (r"\pL", "ж", True),
    (r"\p{^L}", "ж", False), (r"\P{^L}", "ж", True), (r"[\p{Lu}\d]+", "AB\u0663", True), (r"[^\P{Lu}]", "A", True),
    (r"\u0041\u{42}\U00000043", "ABC", True), (r"[\u0061-\u0063]+", "abc", True),
    (r"\x41\x{42}", "AB", True), (r"\Q\d.\E", "\\d.", True), (r"\Q\d.\E", "7x", False),
    (r"(?i)straße", "STRASSE", False), (r"(?i)k", "K", True), (r"a.c", "a\nc", False), (r"(?s)a.c", "a\nc", True),
    (r"[]a]+", "]a", True), (r"[[:alpha:]]+", "abc", True), (r"\bfoo\b", "foo", True),
])
def test_classes_follow_the_engine(pattern: str, text: str, expected: bool) -> None:
    assert full(pattern, text) is expected


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [
    "(?=a)a", "(?!a)b", "(?<=a)b", "(?<!a)b", r"(a)\1", "(unclosed", "a{2,1}", r"\Z", r"\p{NoSuchProperty}", "a**",
    "(?>a)", "a++",
])
def test_syntax_re2_refuses_is_a_syntax_error(pattern: str) -> None:
    with pytest.raises(RegexSyntaxError) as info:
        compile_regex(pattern)
    assert not info.value.too_large
    with pytest.raises(RegexSyntaxError):  # cached, raised afresh
        compile_regex(pattern)


@pytest.mark.parametrize("pattern", ["a{4294967296}", "a{1001}", "a{2,1001}", "a{1001,}", "a{,5000}",
                                     "(?:x{1000}){1000}", "(?:x{100}){20}", "x{99999999999999999999}"])
def test_repetitions_over_1000_are_refused_as_too_large(pattern: str) -> None:
    with pytest.raises(RegexSyntaxError) as info:
        compile_regex(pattern)
    assert info.value.too_large, pattern


def test_repetition_problem_ignores_escapes_classes_and_quoted_text() -> None:
    for pattern in (r"a{1000}", r"\x{2000}", r"[a{5000}]", r"\Qa{5000}\E", r"\p{L}", r"\u{1F600}", "{}", "a{,}"):
        assert repetition_problem(pattern) is None, pattern
    problem = repetition_problem("b{3}a{4294967296}")
    assert problem is not None and "4294967296" in problem and str(MAX_REPEAT) in problem
    long_count = "a{" + "9" * 5000 + "}"  # int() of a 5000-digit string would itself fail: never parsed
    assert repetition_problem(long_count) is not None and len(repetition_problem(long_count) or "") < 200


def test_a_valid_pattern_over_the_memory_budget_is_too_complex_not_a_syntax_error() -> None:
    for pattern in (r"\p{L}{1000}", r"(?:\w+ ){0,100}"):
        with pytest.raises(RegexTooComplex):
            compile_regex(pattern)
    long_classes = r"\w" * 200  # each Unicode \w expands to ~13 000 characters of ranges
    with pytest.raises(RegexTooComplex):
        compile_regex(long_classes)


def test_parse_errors_are_not_logged(capfd: pytest.CaptureFixture[str]) -> None:
    for pattern in ("(?=x)", "((((", r"\p{Nope}", "y{5,2}"):
        with pytest.raises(RegexSyntaxError):
            compile_regex(pattern + str(time.monotonic_ns()))  # never cached before
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_compiled_patterns_are_cached_and_the_cache_is_bounded() -> None:
    first = compile_regex("cached-[0-9]+")
    assert compile_regex("cached-[0-9]+") is first and regex_check.cached("cached-[0-9]+")
    for i in range(regex_check.CACHE_ENTRIES + 5):
        compile_regex(f"filler{i}")
    assert len(regex_check._CACHE) == regex_check.CACHE_ENTRIES
    assert not regex_check.cached("cached-[0-9]+")


def test_python_re_agrees_where_both_are_defined() -> None:
    """On ASCII text and the common syntax, the checker answers as Python's re (the previous checker) did."""
    cases = [(r"[a-z]{3}-\d{2,4}", ["abc-12", "abc-12345", "ab-12"]), (r"(yes|no) [0-9]{1,3}", ["yes 1", "no 1234"]),
             (r"#[0-9a-f]{6}", ["#00ff00", "#00FF00"]), (r"\w+@\w+\.com", ["me@x.com", "me@x.org"]),
             (r"(?P<y>\d{4})-(?P<m>\d\d)", ["2024-01", "24-01"]), (r"a|b|", ["", "a", "c"])]
    for pattern, texts in cases:
        for text in texts:
            assert full(pattern, text) is (re.fullmatch(pattern, text) is not None), (pattern, text)
