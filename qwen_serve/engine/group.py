"""Taking an engine's whole process group down, and waiting until it is gone.

vLLM's API server starts ``EngineCore`` and worker processes that keep running (and keep their memory:
on a GPU, what a restarted engine needs) when the API server dies. They stay in the engine's process
group, whose id is the guard's pid (:mod:`qwen_serve.engine.guard`), so the group is the unit to stop.

:func:`reap_group` is what the supervisor awaits after the engine's guard exited (a crash, a start-up that
failed, a stop) and before anything new is started: SIGTERM to every process left in the group, then
SIGCONT (a stopped process, say a frozen engine, acts on a SIGTERM only once it runs again), up to
``grace`` seconds for them to exit (vLLM's EngineCore shuts down on SIGTERM), SIGKILL to what is left
(SIGKILL ends a stopped process too), then up to ``gone_within`` seconds until none remains. Both waits
are bounded; ``/proc`` is read in a worker thread, so the event loop keeps serving meanwhile. It returns
the pids still alive at the end, ``[]`` when the group is gone (a process stuck in the kernel, ``D``
state, can outlive SIGKILL for a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from qwen_serve.engine.guard import LEFTOVER_GONE_WITHIN_S, LEFTOVER_GRACE_S, group_members

__all__ = ["GROUP_GONE_WITHIN_S", "GROUP_TERM_GRACE_S", "alive_members", "reap_group", "terminate_group"]

GROUP_TERM_GRACE_S = LEFTOVER_GRACE_S  # SIGTERM → SIGKILL for what a dead engine left in its group (3 s)
GROUP_GONE_WITHIN_S = LEFTOVER_GONE_WITHIN_S  # after SIGKILL; a large process's memory is freed first (10 s)
_POLL_S = 0.05


async def alive_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of group ``pgid``, read from ``/proc`` off the event loop."""
    return await asyncio.to_thread(group_members, pgid)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def terminate_group(pgid: int) -> None:
    """SIGTERM to every process of group ``pgid``, then SIGCONT so that stopped ones act on it at once.

    A process stopped by SIGSTOP keeps a SIGTERM pending until it is continued; SIGCONT is harmless to
    processes that run. Never raises for a group that is gone or not ours."""
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)


async def _gone_within(pgid: int, seconds: float) -> list[int]:
    """Wait up to ``seconds`` until group ``pgid`` has no live process; returns those still alive."""
    deadline = time.monotonic() + seconds
    left = await alive_members(pgid)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)
        left = await alive_members(pgid)
    return left


async def reap_group(pgid: int, *, grace: float = GROUP_TERM_GRACE_S,
                     gone_within: float = GROUP_GONE_WITHIN_S) -> list[int]:
    """Stop every process of group ``pgid``: SIGTERM + SIGCONT, ``grace`` s, SIGKILL, ``gone_within`` s more.

    Signals go to the group only while it has live members (an empty group's id may be reused).
    Returns the pids still alive after both waits (``[]``: the group is gone). Never raises for processes
    that are gone or not ours; takes at most about ``grace + gone_within`` seconds.
    """
    if not await alive_members(pgid):
        return []
    terminate_group(pgid)
    if not await _gone_within(pgid, grace):
        return []
    _signal_group(pgid, signal.SIGKILL)
    return await _gone_within(pgid, gone_within)
