"""Linear-time regular expressions for checking guided answers (RE2), with the engine's Unicode classes.

Python's :mod:`re` backtracks: ``(a?){28}a{28}c`` against 60 characters takes seconds, and a client chooses
both the pattern (a guided ``regex``, a JSON Schema ``pattern`` or ``patternProperties`` key) and, through
``max_tokens``, how long the answer is. Everything here runs on RE2 (PyPI ``google-re2``), whose matching
time is linear in the text: at worst ``O(len(text) x program size)`` when its DFA runs out of memory and it
falls back to its NFA; usually a DFA step per byte. RE2 releases the GIL while it matches.

Contract:

* :func:`compile_regex` returns a :class:`Regex`, or raises :class:`RegexSyntaxError` (RE2 refuses the
  syntax, or a counted repetition exceeds :data:`MAX_REPEAT`: the client's fault, and what the engine's
  grammar backends refuse or fail on too) or :class:`RegexTooComplex` (valid, but larger than the checker's
  memory budget: RE2 ``max_mem`` :data:`MAX_MEM`, or a translated pattern over
  :data:`MAX_TRANSLATED_CHARS`; the engine may still enforce it, so a caller reports the answer as not
  verifiable instead of refusing the request). Results, errors included, are cached
  (:data:`CACHE_ENTRIES`, least recently used evicted).
* :func:`repetition_problem` finds a counted repetition over :data:`MAX_REPEAT` without compiling anything
  (RE2 reads ``a{4294967296}`` as a literal, the engine's backends overflow on it).
* :meth:`Regex.fullmatch` / :meth:`Regex.search` answer a bool; :meth:`Regex.cost` is the worst-case work of
  a match (bytes x program instructions), for callers that bound the work per answer.
* Parse errors are never written to stderr (``log_errors`` off). RE2's messages quote the part of the
  pattern they are about: they are meant for the client's 400, not for logs.
* Compiling holds the GIL, for up to tens of milliseconds for the largest programs :data:`MAX_MEM` allows;
  matching does not.

Where the checked syntax differs from the engine's, Python's :mod:`re` and ECMA-262 (JSON Schema ``pattern``):

* ``\\d``, ``\\w``, ``\\s`` (and ``\\D``, ``\\W``, ``\\S``) are Unicode classes, as in the engine's grammar
  (Rust ``regex`` semantics) and Python's ``re``: decimal digits (``Nd``); alphabetic, marks, ``Nd``,
  connector punctuation and join controls; ``White_Space``. RE2 alone and ECMA-262 (without the ``u``/``v``
  flags) make ``\\d``/``\\w`` ASCII. ``\\p{...}``/``\\P{...}``/``\\pL`` are Unicode properties. All of these
  are expanded here to explicit code point ranges taken from the ``regex`` package, whose Unicode tables are
  current (RE2's and Python 3.11's are older: e.g. Garay digits, U+10D40.., are ``\\d`` in the engine).
  ``\\b``/``\\B`` stay RE2's ASCII word boundaries.
* No backreferences (``\\1``), no look-around (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), no atomic groups or
  possessive quantifiers, no ``\\Z`` (use ``\\z``), no ``\\cX``: RE2 refuses them (they cannot be matched in
  linear time), and so do the engine's grammar backends.
* ``\\uHHHH``, ``\\u{H...}`` and ``\\UHHHHHHHH`` (Python, ECMA-262, Rust) are accepted, rewritten to ``\\x{...}``.
* A repetition count is at most 1000 (``x{1001}`` and ``(?:x{100}){100}`` are refused, as by RE2).
  ``{,n}`` is a literal for RE2 (Python reads ``{0,n}``); its count is checked all the same.
* ``.`` excludes only ``\\n`` (ECMA-262 also excludes ``\\r``, U+2028, U+2029); ``$`` without ``(?m)`` is
  the end of the text only (Python's also matches before a final ``\\n``). A ``]`` right after ``[`` or
  ``[^`` is a literal (ECMA-262's ``[]`` matches nothing, ``[^]`` anything). Case folding (``(?i)``) uses
  RE2's simple folding tables.
"""

from __future__ import annotations

import functools
import re
import threading
from array import array
from collections import OrderedDict
from typing import Any, Final

import re2
import regex

__all__ = [
    "CACHE_ENTRIES",
    "MAX_MEM",
    "MAX_REPEAT",
    "MAX_TRANSLATED_CHARS",
    "Regex",
    "RegexError",
    "RegexSyntaxError",
    "RegexTooComplex",
    "cached",
    "compile_regex",
    "repetition_problem",
]

MAX_REPEAT: Final = 1000  # RE2's limit on a counted repetition (and on nested ones multiplied)
MAX_MEM: Final = 2 << 20  # RE2 max_mem per expression: its program and DFA cache together
MAX_TRANSLATED_CHARS: Final = 512 * 1024  # a pattern after the Unicode classes were expanded
CACHE_ENTRIES: Final = 64  # compiled expressions (or their errors) kept: at most ~CACHE_ENTRIES x MAX_MEM

_RE2: Any = re2._re2.RE2  # the binding itself: re2.compile() keeps its own unbounded-memory LRU of 128
_ANCHOR_BOTH: Any = _RE2.Anchor.ANCHOR_BOTH
_UNANCHORED: Any = _RE2.Anchor.UNANCHORED
_NO_MATCH: Final = (-1, -1)
_TOO_LARGE_MESSAGE: Final = "pattern too large"
_REPEAT_MESSAGE: Final = "repetition size"


class RegexError(ValueError):
    """A pattern that cannot be checked; ``str(exc)`` says why (never quotes the whole pattern)."""


class RegexSyntaxError(RegexError):
    """RE2 refuses the syntax (``too_large``: a repetition count over :data:`MAX_REPEAT`)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class RegexTooComplex(RegexError):
    """Valid, but over the checker's memory budget (:data:`MAX_MEM`, :data:`MAX_TRANSLATED_CHARS`)."""


class Regex:
    """A compiled pattern; thread-safe (RE2 objects are), matching releases the GIL."""

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._re = compiled
        self.program_size: int = int(compiled.ProgramSize())

    def cost(self, text: bytes) -> int:
        """Worst-case work of one match of ``text``: bytes x program instructions (the NFA's bound)."""
        return (len(text) + 1) * self.program_size

    def fullmatch(self, text: bytes) -> bool:
        """Whether the whole UTF-8 ``text`` matches."""
        return bool(self._re.Match(_ANCHOR_BOTH, text, 0, len(text))[0] != _NO_MATCH)

    def search(self, text: bytes) -> bool:
        """Whether the pattern matches somewhere in the UTF-8 ``text`` (JSON Schema ``pattern`` semantics)."""
        return bool(self._re.Match(_UNANCHORED, text, 0, len(text))[0] != _NO_MATCH)


# -- compiling -----------------------------------------------------------------------------------


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would log every parse error to stderr through absl
    options.never_capture = True  # no submatches: RE2 can answer from its DFA alone
    options.max_mem = MAX_MEM
    return options


_OPTIONS: Final = _options()


class _Cache:
    """Compiled expressions and errors by pattern text, least recently used evicted first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Regex | RegexError] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, pattern: str) -> Regex | RegexError | None:
        with self._lock:
            found = self._entries.get(pattern)
            if found is not None:
                self._entries.move_to_end(pattern)
            return found

    def put(self, pattern: str, value: Regex | RegexError) -> None:
        with self._lock:
            self._entries[pattern] = value
            self._entries.move_to_end(pattern)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE: Final = _Cache(CACHE_ENTRIES)


def cached(pattern: str) -> bool:
    """Whether :func:`compile_regex` has ``pattern``'s result at hand (then it costs a dict lookup)."""
    return _CACHE.get(pattern) is not None


def compile_regex(pattern: str) -> Regex:
    """``pattern`` (Python / RE2 / ECMA-262 syntax; see the module docstring) compiled for linear-time
    matching with the engine's Unicode classes. Raises :class:`RegexSyntaxError` or :class:`RegexTooComplex`;
    both are cached like successes (and raised afresh)."""
    found = _CACHE.get(pattern)
    if found is None:
        try:
            found = _compile(pattern)
        except RegexError as exc:
            found = exc.with_traceback(None)  # its frames would keep the translated pattern alive
        _CACHE.put(pattern, found)
    if isinstance(found, RegexSyntaxError):
        raise RegexSyntaxError(str(found), too_large=found.too_large)
    if isinstance(found, RegexTooComplex):
        raise RegexTooComplex(str(found))
    assert isinstance(found, Regex)
    return found


def _compile(pattern: str) -> Regex:
    problem = repetition_problem(pattern)
    if problem is not None:
        raise RegexSyntaxError(problem, too_large=True)
    translated = _translate(pattern)
    compiled = _RE2(translated.encode("utf-8", "surrogatepass"), _OPTIONS)
    if compiled.ok():
        return Regex(pattern, compiled)
    message = bytes(compiled.error()).decode("utf-8", "replace")
    if _TOO_LARGE_MESSAGE in message:
        raise RegexTooComplex(f"the expression needs more than the checker's {MAX_MEM >> 20} MiB (RE2 max_mem)")
    raise RegexSyntaxError(message, too_large=_REPEAT_MESSAGE in message and not _inverted_count(message))


def _inverted_count(message: str) -> bool:
    """Whether RE2's "invalid repetition size: {n,m}" is about ``n > m`` (a syntax error), not about size."""
    counts = message.rpartition("{")[2].rstrip("}").split(",")
    return len(counts) == 2 and all(c.isascii() and c.isdigit() and len(c) <= 4 for c in counts) \
        and int(counts[0]) > int(counts[1])


# -- repetition counts -----------------------------------------------------------------------------

_COUNT: Final = re.compile(r"\{[0-9]*(?:,[0-9]*)?\}")  # {n} {n,} {n,m} {,m}: linear, nothing nested


def repetition_problem(pattern: str) -> str | None:
    """Why ``pattern`` has a counted repetition over :data:`MAX_REPEAT` (None: it has none). Counts inside
    character classes, ``\\Q...\\E`` and escapes such as ``\\x{2000}`` or ``\\p{...}`` are not repetitions.
    A scan in C finds the candidates; the pattern is lexed (in Python) only when one is over the limit."""
    if not any(_over_limit(m.group()) for m in _COUNT.finditer(pattern)):
        return None
    for kind, start, end in _tokens(pattern):
        if kind == "count" and _over_limit(count := pattern[start:end]):
            number = max(count[1:-1].split(","), key=len)
            shown = number if len(number) <= 12 else number[:12] + "..."
            return f"repetition count {shown} exceeds the maximum of {MAX_REPEAT}"
    return None


def _over_limit(count: str) -> bool:
    """Whether a ``{n}``/``{n,m}``/``{,m}`` text has a number over :data:`MAX_REPEAT`."""
    return any(len(n) > 4 or (n != "" and int(n) > MAX_REPEAT) for n in count[1:-1].split(","))


def _tokens(pattern: str) -> list[tuple[str, int, int]]:
    """A flat lexing of ``pattern``: (kind, start, end) with kind ``escape`` (a whole escape: ``\\x{..}``,
    ``\\p{..}``, ``\\Q..\\E``...), ``class_open`` (``[``, ``[^``, and a literal ``]`` right after them),
    ``class_close``, ``posix`` (``[:alpha:]`` in a class), ``count`` (``{n,m}`` outside classes) or ``char``.
    Escapes inside a class are marked ``class_escape``."""
    tokens: list[tuple[str, int, int]] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            end = _escape_end(pattern, i)
            tokens.append(("class_escape" if in_class else "escape", i, end))
            i = end
        elif in_class:
            if c == "[" and pattern.startswith("[:", i) and (close := pattern.find(":]", i + 2)) >= 0:
                tokens.append(("posix", i, close + 2))
                i = close + 2
            elif c == "]":
                tokens.append(("class_close", i, i + 1))
                in_class = False
                i += 1
            else:
                tokens.append(("char", i, i + 1))
                i += 1
        elif c == "[":
            end = i + 1
            if pattern.startswith("^", end):
                end += 1
            if pattern.startswith("]", end):
                end += 1
            tokens.append(("class_open", i, end))
            in_class = True
            i = end
        elif c == "{" and (m := _COUNT.match(pattern, i)) is not None:
            tokens.append(("count", i, m.end()))
            i = m.end()
        else:
            tokens.append(("char", i, i + 1))
            i += 1
    return tokens


def _escape_end(pattern: str, i: int) -> int:
    """End of the escape starting at ``pattern[i] == "\\\\"``."""
    n = len(pattern)
    if i + 1 >= n:
        return n
    e = pattern[i + 1]
    if e == "Q":
        close = pattern.find("\\E", i + 2)
        return n if close < 0 else close + 2
    if e in "xpPuU" and pattern.startswith("{", i + 2):
        close = pattern.find("}", i + 3)
        return n if close < 0 else close + 1
    if e in "pP" and i + 2 < n:
        return i + 3  # \pL
    if e == "x":
        return _hex_end(pattern, i + 2, 2)
    if e == "u":
        return _hex_end(pattern, i + 2, 4)
    if e == "U":
        return _hex_end(pattern, i + 2, 8)
    return i + 2


def _hex_end(pattern: str, start: int, digits: int) -> int:
    end = start
    while end < min(len(pattern), start + digits) and pattern[end] in "0123456789abcdefABCDEF":
        end += 1
    return end


# -- Unicode classes -------------------------------------------------------------------------------

_PERL_CLASSES: Final = {"d": r"\d", "w": r"\w", "s": r"\s"}
_PROPERTY_NAME: Final = re.compile(r"\^?[A-Za-z0-9_ .:=&-]{1,64}")
_MAX_CODE_POINT: Final = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]


@functools.cache
def _code_points() -> str:
    """Every code point but the surrogates, in order (4.4 MB, built once, in ~10 ms)."""
    points = array("I", range(0xD800))
    points.extend(range(0xE000, _MAX_CODE_POINT + 1))
    return points.tobytes().decode("utf-32-le" if points.itemsize == 4 else "utf-32")


@functools.lru_cache(maxsize=256)
def _ranges(class_pattern: str) -> Ranges | None:
    """The code point ranges a one-character ``regex`` class matches (current Unicode); None when the
    ``regex`` package does not know it."""
    try:
        compiled = regex.compile(class_pattern + "+", flags=regex.VERSION0)
    except regex.error:
        return None
    text = _code_points()
    return tuple((ord(text[m.start()]), ord(text[m.end() - 1])) for m in compiled.finditer(text))


def _complement(ranges: Ranges) -> Ranges:
    out, low = [], 0
    for a, b in ranges:
        if a > low:
            out.append((low, a - 1))
        low = b + 1
    if low <= _MAX_CODE_POINT:
        out.append((low, _MAX_CODE_POINT))
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _items(ranges: Ranges) -> str:
    return "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)


def _class_ranges(escape: str) -> tuple[Ranges, bool] | None:
    """``(ranges, negated)`` of a class escape (``\\d``, ``\\W``, ``\\p{Greek}``, ``\\pL``, ``\\P{^L}``...);
    None when it is not one or the property is unknown (RE2 then decides)."""
    kind = escape[1:2]
    if kind.lower() in _PERL_CLASSES:
        ranges = _ranges(_PERL_CLASSES[kind.lower()])
        return None if ranges is None else (ranges, kind.isupper())
    if kind not in ("p", "P"):
        return None
    name = escape[3:-1] if escape[2:3] == "{" else escape[2:]
    if not _PROPERTY_NAME.fullmatch(name):
        return None
    negated = kind == "P"
    if name.startswith("^"):
        name, negated = name[1:], not negated
    ranges = _ranges("\\p{" + name + "}")
    return None if ranges is None else (ranges, negated)


def _translate(pattern: str) -> str:
    """``pattern`` with its Unicode class escapes expanded to explicit ranges and ``\\u`` escapes rewritten
    to ``\\x{...}``; raises :class:`RegexTooComplex` past :data:`MAX_TRANSLATED_CHARS`."""
    out: list[str] = []
    size = 0
    for kind, start, end in _tokens(pattern):
        piece = pattern[start:end]
        if kind in ("escape", "class_escape"):
            piece = _translate_escape(piece, in_class=kind == "class_escape")
        out.append(piece)
        size += len(piece)
        if size > MAX_TRANSLATED_CHARS:
            raise RegexTooComplex(
                f"the expression's Unicode classes expand to more than {MAX_TRANSLATED_CHARS} characters")
    return "".join(out)


def _translate_escape(escape: str, *, in_class: bool) -> str:
    if escape[1:2] in ("u", "U"):
        digits = escape[3:-1] if escape[2:3] == "{" else escape[2:]
        if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
            return f"\\x{{{digits}}}"
        return escape  # RE2 reports it
    found = _class_ranges(escape)
    if found is None:
        return escape
    ranges, negated = found
    if in_class:
        return _items(_complement(ranges) if negated else ranges)
    return ("[^" if negated else "[") + _items(ranges) + "]"
