"""The work budget of one guided answer check: whatever the constraint and the answer, a check stops.

A :class:`Budget` is made per checked response and spent by the check as it goes: JSON Schema keyword
evaluations (:meth:`Budget.spend_steps`, one unit per keyword plus the sizes it iterates over) and regular
expression matching (:meth:`Budget.spend_match`, bytes x RE2 program instructions: the worst case of RE2's
NFA, though its DFA usually needs one step per byte). Spending past either limit raises :class:`OverBudget`;
the caller then reports the answer as ``unverified`` rather than ``valid``/``invalid``.

Two sizes: :meth:`Budget.inline` for a check that runs on the event loop (a few milliseconds at most),
:meth:`Budget.worker` for one that runs in a worker thread (about a second of CPU at most on a small VM).
Answers longer than :data:`MAX_ANSWER_CHARS` are not parsed at all (``json.loads`` holds the GIL).
A budget is used by one thread at a time.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ANSWER_CHARS", "Budget", "OverBudget"]

MAX_ANSWER_CHARS: Final = 1 << 20  # longer answers are not checked: unverified

# steps: 2.5 to 7 us each in jsonschema on a small VM; match work: ~4 ns per unit in RE2's NFA (worst case)
_INLINE_STEPS: Final = 5_000
_INLINE_MATCH: Final = 2_500_000
_WORKER_STEPS: Final = 100_000
_WORKER_MATCH: Final = 200_000_000


class OverBudget(Exception):
    """The check needed more work than its budget allows."""


class Budget:
    """Remaining work of one check."""

    def __init__(self, steps: int, match_work: int) -> None:
        self.steps = steps
        self.match_work = match_work

    @classmethod
    def inline(cls) -> Budget:
        """For a check on the event loop: a few milliseconds at most."""
        return cls(_INLINE_STEPS, _INLINE_MATCH)

    @classmethod
    def worker(cls) -> Budget:
        """For a check in a worker thread: about a second of CPU at most."""
        return cls(_WORKER_STEPS, _WORKER_MATCH)

    def spend_steps(self, units: int) -> None:
        self.steps -= units
        if self.steps < 0:
            raise OverBudget("the answer needs more schema evaluation than a check may spend")

    def spend_match(self, units: int) -> None:
        self.match_work -= units
        if self.match_work < 0:
            raise OverBudget("the answer needs more regular-expression matching than a check may spend")
