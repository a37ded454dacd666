"""Per-key rpm/tpm/concurrency limits shared by the gateway worker processes of one host.

:class:`SharedLimiter` is a :class:`~qwen_serve.gateway.limits.Limiter` whose state lives in one
memory-mapped file (on ``/dev/shm`` when there is one) that every worker maps: the worker supervisor
(:mod:`qwen_serve.workers`) creates it with :meth:`SharedLimiter.create` before it starts the workers, each
worker attaches with :meth:`SharedLimiter.attach` (``build_limiter`` does, when
:data:`~qwen_serve.gateway.limits.SHARED_LIMITS_ENV` names the file). The accounting is exactly
:class:`~qwen_serve.gateway.limits.LocalLimiter`'s (the rules in :mod:`qwen_serve.gateway.limits`, the same
:func:`~qwen_serve.gateway.limits.refusal`): the same buckets of ``resolution_s`` > 0 over the same window,
kept in a fixed ring per key and ledger, so N workers admit together what one process would admit alone.

Consistency: every admission and release runs under an exclusive ``flock`` of the file (a few microseconds,
no await inside); ``time.monotonic`` is the host's clock, the same in every process.

Dead workers: each lease is an entry of a lease table, tagged with the worker's pid, and an owner table
counts the leases per pid. :meth:`reclaim` (the supervisor calls it when it has reaped a worker, before any
restart) releases every lease of that pid as if its request had ended unmetered (the estimate stays
charged), and rebuilds the affected keys' counters from the lease table and their buckets, so even a
worker killed inside an update leaves nothing behind. A worker refused by a key's limits also reclaims, at
most once a second, the leases of owners that no longer exist (``os.kill(pid, 0)``), in case no supervisor
did, and then tries once more.

Capacity is fixed at creation: ``key_slots`` keys with any limit (a slot is kept for the life of the file)
and ``lease_slots`` requests in flight with a limit. Past either, ``limits.on_backend_error`` decides:
``fail_closed`` refuses with 503 (:class:`~qwen_serve.errors.LimiterUnavailable`), ``fail_open`` admits
unmetered. The file is sparse: memory is used by keys and leases actually seen (about 19 KiB per key at the
default 0.1 s resolution).

Not thread-safe within one process (like ``LocalLimiter``: the event loop's thread only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from qwen_serve.errors import LimiterUnavailable
from qwen_serve.gateway.limits import (RESOLUTION_S, WINDOW_S, KeyLimits, Lease, refusal, too_large)

__all__ = ["DEFAULT_KEY_SLOTS", "DEFAULT_LEASE_SLOTS", "SharedLimiter"]

DEFAULT_KEY_SLOTS = 1024
DEFAULT_LEASE_SLOTS = 65536
_MAGIC = 0x71737368_6C696D31  # "qsshlim1"
_OWNERS = 256  # processes that may hold leases at once (workers, restarted ones until reclaimed)
_OWNERS_AT = 16
_HEADER = _OWNERS_AT + 2 * _OWNERS  # words (8 bytes each)
# header words; then the owner table: (pid, leases it holds) per entry
_H_MAGIC, _H_KEYS, _H_RING, _H_LEASES, _H_USED, _H_FREE, _H_RES, _H_WINDOW, _H_SPAN = range(9)
# per key: digest (4 words), in_flight, in_flight_tokens, two ledger headers (head, count, total, expiry), rings
_K_DIGEST, _K_IN_FLIGHT, _K_TOKENS, _K_STARTS, _K_DONE, _K_RINGS = 0, 4, 5, 6, 10, 14
_L_HEAD, _L_COUNT, _L_TOTAL, _L_EXPIRY = range(4)
# per lease: key slot + 1 (0: free), pid, estimate (-1: tokens not tracked), generation
_LEASE = 4
_RECLAIM_EVERY_S = 1.0
_INF = math.inf


class _Ring:
    """One ledger (admissions or finished charges) of a key in the shared file, with
    :class:`~qwen_serve.gateway.limits._Ledger`'s semantics: buckets oldest first, ``total`` their sum,
    ``expiry`` when the oldest stops counting. ``head`` is the header's first word, ``ring`` the first word
    of its ``capacity`` (start, amount) pairs. The caller holds the lock."""

    def __init__(self, q: memoryview[int], d: memoryview[float], head: int, ring: int, capacity: int, resolution: float,
                 span: float) -> None:
        self._q, self._d = q, d
        self._head, self._ring, self._capacity = head, ring, capacity
        self._resolution, self.span = resolution, span

    @property
    def total(self) -> int:
        return int(self._q[self._head + _L_TOTAL])

    @property
    def expiry(self) -> float:
        return float(self._d[self._head + _L_EXPIRY])

    def _entries(self) -> Iterator[tuple[float, int]]:
        q, d, h, ring, cap = self._q, self._d, self._head, self._ring, self._capacity
        first, count = q[h + _L_HEAD], q[h + _L_COUNT]
        for i in range(count):
            at = ring + 2 * ((first + i) % cap)
            yield d[at], q[at + 1]

    def add(self, now: float, amount: int) -> None:
        q, d, h, ring, cap = self._q, self._d, self._head, self._ring, self._capacity
        first, count = q[h + _L_HEAD], q[h + _L_COUNT]
        if count == 0:
            at = ring + 2 * first
            d[at], q[at + 1] = now, amount
            q[h + _L_COUNT] = 1
            d[h + _L_EXPIRY] = now + self.span
        else:
            last = ring + 2 * ((first + count - 1) % cap)
            if now < d[last] + self._resolution or count >= cap:  # a full ring (never with R > 0) merges
                q[last + 1] += amount
            else:
                at = ring + 2 * ((first + count) % cap)
                d[at], q[at + 1] = now, amount
                q[h + _L_COUNT] = count + 1
        q[h + _L_TOTAL] += amount

    def prune(self, now: float) -> None:
        q, d, h, ring, cap, span = self._q, self._d, self._head, self._ring, self._capacity, self.span
        first, count, total = q[h + _L_HEAD], q[h + _L_COUNT], q[h + _L_TOTAL]
        while count and d[ring + 2 * first] + span <= now:
            total -= q[ring + 2 * first + 1]
            first = (first + 1) % cap
            count -= 1
        q[h + _L_HEAD], q[h + _L_COUNT], q[h + _L_TOTAL] = first, count, total
        d[h + _L_EXPIRY] = d[ring + 2 * first] + span if count else _INF

    def repair(self) -> None:
        """Recompute ``total`` and ``expiry`` from the buckets (after a writer died mid-update)."""
        q, d, h = self._q, self._d, self._head
        entries = list(self._entries())
        q[h + _L_TOTAL] = sum(amount for _, amount in entries)
        d[h + _L_EXPIRY] = entries[0][0] + self.span if entries else _INF

    def wait_to_free(self, amount: int, now: float) -> float | None:
        freed = 0
        for start, booked in self._entries():
            freed += booked
            if freed >= amount:
                return start + self.span - now
        return None

    def newest_end(self) -> float | None:
        q, d, h = self._q, self._d, self._head
        count = q[h + _L_COUNT]
        if not count:
            return None
        last = self._ring + 2 * ((q[h + _L_HEAD] + count - 1) % self._capacity)
        return float(d[last]) + self.span


class _SharedLease:
    def __init__(self, limiter: SharedLimiter, index: int, generation: int) -> None:
        self._limiter = limiter
        self._index = index
        self._generation = generation
        self._released = False

    def release(self, actual_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self._index, self._generation, actual_tokens)


class _NoLease:
    def release(self, actual_tokens: int | None = None) -> None:
        pass


_NO_LEASE = _NoLease()


class SharedLimiter:
    """A :class:`~qwen_serve.gateway.limits.Limiter` in a shared-memory file (see the module docstring).

    Build the file once with :meth:`create`, then :meth:`attach` in every process; ``clock`` (seconds,
    the same in every process) and ``pid`` are injectable for tests. :meth:`try_acquire` is the synchronous
    :meth:`acquire`.
    """

    def __init__(self, path: str | Path, *, on_error: Literal["fail_closed", "fail_open"] = "fail_closed",
                 clock: Callable[[], float] = time.monotonic, pid: int | None = None) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._q = memoryview(self._mm).cast("q")
        self._d = memoryview(self._mm).cast("d")
        q, d = self._q, self._d
        if q[_H_MAGIC] != _MAGIC:
            self.close()
            raise ValueError(f"{self.path}: not a shared limits file")
        self._keys, self._ring, self._leases = int(q[_H_KEYS]), int(q[_H_RING]), int(q[_H_LEASES])
        self._resolution, self._window, self._span = float(d[_H_RES]), float(d[_H_WINDOW]), float(d[_H_SPAN])
        self._key_words = _K_RINGS + 4 * self._ring
        self._keys_at = _HEADER
        self._leases_at = self._keys_at + self._keys * self._key_words
        self._free_at = self._leases_at + self._leases * _LEASE
        self._slots: dict[str, int] = {}  # key id -> slot, a cache of the shared table
        self._ring_views: dict[int, tuple[_Ring, _Ring]] = {}  # slot base -> its two ledgers
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._on_error = on_error
        self._reclaimed_at = -_INF
        self._owner = -1  # this process's entry in the owner table (checked before use)

    # ------------------------------------------------------------------ the file
    @classmethod
    def create(cls, path: str | Path, *, key_slots: int = DEFAULT_KEY_SLOTS, lease_slots: int = DEFAULT_LEASE_SLOTS,
               window_s: float = WINDOW_S, resolution_s: float = RESOLUTION_S) -> Path:
        """Write an empty shared limits file at ``path`` (mode 0600, replaced if it exists); returns it."""
        if not 0 < resolution_s < window_s:
            raise ValueError("resolution_s must be > 0 and below window_s (the shared limiter keeps buckets)")
        span = window_s + resolution_s
        ring = math.floor(span / resolution_s) + 2  # buckets alive at once, at most, plus one spare
        words = _HEADER + key_slots * (_K_RINGS + 4 * ring) + lease_slots * _LEASE + lease_slots
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, words * 8)  # sparse: zeroed pages cost nothing until touched
            with mmap.mmap(fd, words * 8) as mm:
                q, d = memoryview(mm).cast("q"), memoryview(mm).cast("d")
                q[_H_KEYS], q[_H_RING], q[_H_LEASES] = key_slots, ring, lease_slots
                d[_H_RES], d[_H_WINDOW], d[_H_SPAN] = resolution_s, window_s, span
                free_at = _HEADER + key_slots * (_K_RINGS + 4 * ring) + lease_slots * _LEASE
                for i in range(lease_slots):  # the free stack: every lease entry, the lowest on top
                    q[free_at + i] = lease_slots - 1 - i
                q[_H_FREE] = lease_slots
                q[_H_MAGIC] = _MAGIC  # last: a reader never sees a half-written header
                del q, d
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path

    @classmethod
    def attach(cls, path: str | Path, *,
               on_error: Literal["fail_closed", "fail_open"] = "fail_closed") -> SharedLimiter:
        """The limiter of this process on the file :meth:`create` wrote."""
        return cls(path, on_error=on_error)

    def close(self) -> None:
        """Unmap the file (leases not yet released stay in it until :meth:`reclaim`)."""
        if self._mm.closed:
            return
        self._q.release()
        self._d.release()
        self._mm.close()
        os.close(self._fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ Limiter
    async def acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        return self.try_acquire(principal, estimated_tokens)

    async def aclose(self) -> None:
        self.close()

    def try_acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        rpm, tpm, concurrency = principal.rpm, principal.tpm, principal.max_concurrent
        if rpm is None and tpm is None and concurrency is None:
            return _NO_LEASE
        estimate = estimated_tokens if estimated_tokens > 0 else 0
        if tpm is not None and estimate > tpm:
            raise too_large(principal.key_id, estimate, tpm)
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            slot = self._slot(principal.key_id)
            if slot is None:
                return self._unavailable("the shared limits table is full (limits: keys with a limit)")
            lease = self._admit(principal, slot, estimate)
            if lease is not None:
                return lease
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if self._reclaim_dead():  # a dead worker's leases may hold the room: retry once without them
            with self._locked():
                lease = self._admit(principal, slot, estimate)
                if lease is not None:
                    return lease
        with self._locked():
            raise self._refusal(principal, slot, estimate)

    def _admit(self, principal: KeyLimits, slot: int, estimate: int) -> Lease | None:
        """Book the request if every limit allows it (the lock is held); None when one refuses."""
        rpm, tpm, concurrency = principal.rpm, principal.tpm, principal.max_concurrent
        q = self._q
        base = self._keys_at + slot * self._key_words
        now = self._clock()
        starts, done = self._rings(base)
        if now >= starts.expiry:
            starts.prune(now)
        if now >= done.expiry:
            done.prune(now)
        if ((concurrency is not None and q[base + _K_IN_FLIGHT] >= concurrency)
                or (rpm is not None and starts.total >= rpm)
                or (tpm is not None and q[base + _K_TOKENS] + done.total + estimate > tpm)):
            return None
        owner = self._own_entry()
        index = self._take_lease() if owner >= 0 else None
        if index is None:
            return self._unavailable("the shared limits table is full (limits: requests in flight)")
        q[owner + 1] += 1
        at = self._leases_at + index * _LEASE
        tracked = estimate if tpm is not None else -1
        generation = q[at + 3] + 1
        q[at + 1], q[at + 2], q[at + 3] = self._pid, tracked, generation
        q[at] = slot + 1  # the entry counts from here on (a reclaim rebuilds the counters from the table)
        q[base + _K_IN_FLIGHT] += 1
        if rpm is not None:
            starts.add(now, 1)
        if tracked >= 0:
            q[base + _K_TOKENS] += tracked
        return _SharedLease(self, index, int(generation))

    def _refusal(self, principal: KeyLimits, slot: int, estimate: int) -> Exception:
        q = self._q
        base = self._keys_at + slot * self._key_words
        starts, done = self._rings(base)
        return refusal(principal, int(q[base + _K_IN_FLIGHT]), int(q[base + _K_TOKENS]), starts, done, estimate,
                       self._clock(), self._window)

    def _release(self, index: int, generation: int, actual_tokens: int | None) -> None:
        q = self._q
        at = self._leases_at + index * _LEASE
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if q[at] == 0 or q[at + 3] != generation or q[at + 1] != self._pid:
                return  # reclaimed meanwhile (this process was taken for dead): nothing of ours is left
            self._drop_lease(at, index, actual_tokens)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _drop_lease(self, at: int, index: int, actual_tokens: int | None) -> None:
        """Free lease entry ``index`` (at word ``at``) and book its charge (the lock is held)."""
        q = self._q
        slot = int(q[at]) - 1
        estimate = int(q[at + 2])
        owner = self._owner_of(int(q[at + 1]))
        if owner >= 0 and q[owner + 1] > 0:
            q[owner + 1] -= 1
        base = self._keys_at + slot * self._key_words
        q[at] = 0
        q[self._free_at + q[_H_FREE]] = index
        q[_H_FREE] += 1
        q[base + _K_IN_FLIGHT] -= 1
        if estimate >= 0:
            q[base + _K_TOKENS] -= estimate
            tokens = estimate if actual_tokens is None else int(actual_tokens)
            if tokens > 0:
                self._rings(base)[1].add(self._clock(), tokens)

    def _owner_of(self, pid: int) -> int:
        """The owner-table word of ``pid``, or -1."""
        q = self._q
        if self._owner >= 0 and q[self._owner] == pid:
            return self._owner
        for entry in range(_OWNERS_AT, _OWNERS_AT + 2 * _OWNERS, 2):
            if q[entry] == pid:
                return entry
        return -1

    def _own_entry(self) -> int:
        """This process's owner entry, claimed on first use (an entry whose leases are all gone can be taken
        over); -1 when every entry holds leases of a live process."""
        q = self._q
        entry = self._owner_of(self._pid)
        if entry < 0:
            for candidate in range(_OWNERS_AT, _OWNERS_AT + 2 * _OWNERS, 2):
                if q[candidate + 1] <= 0:
                    q[candidate], q[candidate + 1] = self._pid, 0
                    entry = candidate
                    break
        self._owner = entry
        return entry

    def _take_lease(self) -> int | None:
        q = self._q
        free = q[_H_FREE]
        if free <= 0:
            return None
        q[_H_FREE] = free - 1
        return int(q[self._free_at + free - 1])

    def _unavailable(self, reason: str) -> Lease:
        if self._on_error == "fail_open":
            return _NO_LEASE
        raise LimiterUnavailable(f"rate limits unavailable: {reason}")

    def _rings(self, base: int) -> tuple[_Ring, _Ring]:
        views = self._ring_views.get(base)
        if views is None:
            rings = base + _K_RINGS
            views = self._ring_views[base] = (
                _Ring(self._q, self._d, base + _K_STARTS, rings, self._ring, self._resolution, self._span),
                _Ring(self._q, self._d, base + _K_DONE, rings + 2 * self._ring, self._ring, self._resolution,
                      self._span))
        return views

    def _slot(self, key_id: str) -> int | None:
        """The key's slot, claimed on first use (the lock is held); None when the table is full."""
        slot = self._slots.get(key_id)
        if slot is not None:
            return slot
        digest = hashlib.blake2b(key_id.encode(), digest_size=32).digest()
        words = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]
        if not any(words):
            words[0] = 1
        q, keys = self._q, self._keys
        start = (words[0] & 0x7FFFFFFFFFFFFFFF) % keys
        for probe in range(keys):
            slot = (start + probe) % keys
            base = self._keys_at + slot * self._key_words
            current = [q[base + i] for i in range(4)]
            if current == words:
                break
            if not any(current):  # free: claim it
                for i in range(4):
                    q[base + i] = words[i]
                q[_H_USED] += 1
                break
        else:
            return None
        self._slots[key_id] = slot
        return slot

    # ------------------------------------------------------------------ dead workers
    def reclaim(self, pid: int) -> int:
        """Release every lease held by process ``pid`` (which must have exited) as an unmetered end of its
        request, and rebuild the counters of the keys it touched; returns the leases released. One pass over
        the lease table (milliseconds at the default size); the supervisor calls it once per dead worker."""
        with self._locked():
            return self._reclaim({pid})

    def _reclaim_dead(self) -> int:
        """At most once per second: :meth:`reclaim` the owners that hold leases but no longer exist."""
        now = time.monotonic()
        if now - self._reclaimed_at < _RECLAIM_EVERY_S:
            return 0
        self._reclaimed_at = now
        q = self._q
        with self._locked():
            dead = {int(q[e]) for e in range(_OWNERS_AT, _OWNERS_AT + 2 * _OWNERS, 2)
                    if q[e + 1] > 0 and q[e] != self._pid and not _alive(int(q[e]))}
            return self._reclaim(dead) if dead else 0

    def _reclaim(self, pids: set[int]) -> int:
        q = self._q
        touched: set[int] = set()
        released = 0
        for index in range(self._leases):
            at = self._leases_at + index * _LEASE
            if q[at] != 0 and q[at + 1] in pids:
                touched.add(int(q[at]) - 1)
                self._drop_lease(at, index, None)
                released += 1
        for entry in range(_OWNERS_AT, _OWNERS_AT + 2 * _OWNERS, 2):
            if q[entry] in pids:
                q[entry], q[entry + 1] = 0, 0
        if touched:
            self._rebuild(touched)
        return released

    def _rebuild(self, slots: set[int]) -> None:
        """The keys' in-flight counters from the lease table, their ledgers' totals from their buckets."""
        q = self._q
        counts = {slot: [0, 0] for slot in slots}
        for index in range(self._leases):
            at = self._leases_at + index * _LEASE
            owner = q[at] - 1
            if owner in counts:
                counts[owner][0] += 1
                counts[owner][1] += max(0, int(q[at + 2]))
        for slot, (in_flight, tokens) in counts.items():
            base = self._keys_at + slot * self._key_words
            q[base + _K_IN_FLIGHT], q[base + _K_TOKENS] = in_flight, tokens
            for ring in self._rings(base):
                ring.repair()

    # ------------------------------------------------------------------ introspection (tests, debugging)
    def in_flight(self, key_id: str) -> int:
        """Unreleased leases of ``key_id`` across every process."""
        with self._locked():
            slot = self._slot(key_id)
            return 0 if slot is None else int(self._q[self._keys_at + slot * self._key_words + _K_IN_FLIGHT])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
