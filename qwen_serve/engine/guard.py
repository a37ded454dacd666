"""The engine's process-group leader: the engine never outlives the gateway that started it.

:class:`~qwen_serve.engine.supervisor.EngineSupervisor` starts ``python -I guard.py <gateway pid>
<engine argv...>`` (:func:`guarded_command`) in a new session, so the guard's pid is the id of the
engine's process group. The guard runs the engine as its child in that group, and:

* asks Linux (``prctl(PR_SET_PDEATHSIG)``) for ``SIGHUP`` when the gateway dies, however it dies
  (SIGKILL, OOM kill, a crash). On it, the guard sends SIGTERM to the group, gives the engine
  :data:`ORPHAN_GRACE_S` to exit, then SIGKILLs the whole group, itself included. vLLM's own children
  (EngineCore, workers) stay alive when their parent is SIGKILLed, so the group, not one pid, is what
  is stopped. A gateway that died before the guard could ask is caught by comparing ``getppid()``.
* gives the engine ``PR_SET_PDEATHSIG`` = SIGTERM towards the guard, should the guard itself be killed;
* ignores the SIGTERM/SIGINT the supervisor sends to the group (the engine gets them too) and waits;
* when the engine exits (a crash included), stops what is left in the group (children the engine left
  orphaned, such as vLLM's EngineCore and workers): SIGTERM and SIGCONT (for stopped ones), up to
  :data:`LEFTOVER_GRACE_S` for them to exit, SIGKILL, then up to :data:`LEFTOVER_GONE_WITHIN_S` until
  none is left; then it exits as the engine did: with its exit code, or killed by the same signal. The
  supervisor checks the group again once the guard is gone (:mod:`qwen_serve.engine.group`), for a guard
  that was itself killed.

Run as a script by path, so starting it imports nothing of ``qwen_serve`` (nor its dependencies) and
costs one bare interpreter. It uses the standard library only. ``PR_SET_PDEATHSIG`` tracks the thread
that started the guard: the supervisor runs on the event loop's thread, which lives as long as the
gateway. Without ``prctl`` (not Linux) the guard still forwards exit codes and cleans the group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["GUARD_PATH", "LEFTOVER_GONE_WITHIN_S", "LEFTOVER_GRACE_S", "ORPHAN_GRACE_S", "group_members",
           "guarded_command", "main", "set_parent_death_signal"]

GUARD_PATH = Path(__file__).resolve()
ORPHAN_GRACE_S = 3.0  # SIGTERM → SIGKILL when the gateway is gone; the engine's port must be free in < 10 s
LEFTOVER_GRACE_S = 3.0  # the engine exited: SIGTERM → SIGKILL for what it left in the group
LEFTOVER_GONE_WITHIN_S = 10.0  # after that SIGKILL, how long to wait for those processes to be gone
_PR_SET_PDEATHSIG = 1


class _GatewayGone(Exception):
    """Raised from the SIGHUP handler: the gateway died."""


def guarded_command(engine_argv: Sequence[str], *, python: str, parent: int) -> list[str]:
    """The argv that runs ``engine_argv`` under the guard; ``parent`` is the pid of the process spawning it."""
    return [python, "-I", str(GUARD_PATH), str(parent), *engine_argv]


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where unsupported."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``, read from ``/proc``."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _others_in_group() -> list[int]:
    """The other live members of this process group."""
    me = os.getpid()
    return [pid for pid in group_members(os.getpgrp()) if pid != me]


def _others_gone_within(seconds: float) -> bool:
    """Wait up to ``seconds`` until no other member of this group is alive; returns whether none is."""
    deadline = time.monotonic() + seconds
    while _others_in_group():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_others_in_group(grace: float, gone_within: float) -> None:
    """SIGTERM (+ SIGCONT) the group (this process ignores it), wait up to ``grace`` s for the others to
    exit, SIGKILL those left (one by one: this process stays), and wait up to ``gone_within`` s until they
    are gone."""
    if not _others_in_group():
        return
    os.killpg(0, signal.SIGTERM)
    os.killpg(0, signal.SIGCONT)  # a stopped process acts on the SIGTERM only once continued
    if _others_gone_within(grace):
        return
    deadline = time.monotonic() + gone_within
    while (left := _others_in_group()) and time.monotonic() < deadline:
        for pid in left:  # again on each round: a process may have forked before it was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _stop_group(grace: float) -> None:
    """SIGTERM the group, wait up to ``grace`` s for the others to exit, then SIGKILL it (this process too)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)  # this process has a no-op handler for it
    os.killpg(0, signal.SIGCONT)  # a stopped process acts on the SIGTERM only once continued
    me = os.getpid()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid != me for pid in group_members(os.getpgrp())):
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)


def _on_gateway_death(signum: int, frame: FrameType | None) -> None:
    raise _GatewayGone


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing (unlike SIG_IGN, it is not inherited by the engine)."""


def _engine_preexec() -> None:
    """In the engine's process, before exec: SIGTERM when the guard dies."""
    set_parent_death_signal(signal.SIGTERM)


def _exit_like(returncode: int) -> int:
    """Exit with ``returncode``; a negative one (killed by a signal) is re-raised as that signal."""
    if returncode >= 0:
        return returncode
    sig = -returncode
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + sig  # the signal's default action does not end a process (SIGCHLD, SIGWINCH...)


def main(argv: Sequence[str]) -> int:
    """``guard.py <gateway pid> <engine argv...>``: run the engine; returns the exit code to exit with."""
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: guard.py <gateway pid> <engine argv...>", file=sys.stderr)
        return 2
    gateway, command = int(argv[0]), list(argv[1:])
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGHUP, _on_gateway_death)
    try:
        set_parent_death_signal(signal.SIGHUP)
        if os.getppid() != gateway:
            raise _GatewayGone
        engine = subprocess.Popen(command, preexec_fn=_engine_preexec)  # safe: the guard has one thread
        returncode = engine.wait()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except _GatewayGone:
        _stop_group(ORPHAN_GRACE_S)
        return 1  # not reached: the group's SIGKILL ends this process
    _stop_others_in_group(LEFTOVER_GRACE_S, LEFTOVER_GONE_WITHIN_S)
    return _exit_like(returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
