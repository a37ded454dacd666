"""What the load generator sends and what it records: the data model every other ``bench`` module shares.

* :class:`RequestSpec` is built by ``workloads`` before a run starts (no tokenizer or file work while
  requests are in flight). ``body`` is the JSON body without ``model``, ``stream`` and
  ``stream_options``, which the client adds.
* :class:`RequestRecord` is filled by ``client`` for one sent request. Times are seconds on
  ``time.perf_counter()`` relative to the run's start (``t0``): ``scheduled`` is when the arrival
  process said the request was due, ``sent`` when the client actually wrote it, ``chunk_times`` when
  each SSE event with generated text arrived. Latencies (``ttft_ms``, ``e2el_ms``) are measured from
  ``scheduled``, so a client or a concurrency cap that delays sending shows up in them (no coordinated
  omission); ``schedule_lag_ms`` is ``sent - scheduled``.
* Token counts come from the server's ``usage`` (``input_tokens``/``output_tokens``); ``None`` when the
  server sent none. ``chunk_tokens[i]`` is how many tokens event ``i`` carried (from vLLM's continuous
  usage stats when present, else an even split of ``output_tokens``), so ITL is per token, not per event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RequestSpec", "RequestRecord"]


@dataclass(slots=True)
class RequestSpec:
    """One request of a workload (immutable once the run starts)."""

    index: int
    body: dict[str, Any]
    """Chat body without ``model``/``stream``/``stream_options`` (``messages``, ``max_tokens``, ...)."""
    input_tokens: int | None = None
    """Prompt tokens as the server counts them (``/tokenize``), ``None`` when not known exactly."""
    output_tokens: int | None = None
    """Target output length (``max_tokens``; with ``ignore_eos`` the server should hit it exactly)."""
    kind: str = "chat"
    """Workload name that built it (``random``, ``sharegpt``, ``multi-turn``, ``json-schema``, ...)."""
    conversation: int | None = None
    """Multi-turn: the conversation id; ``turn`` is the 0-based turn within it."""
    turn: int = 0
    schema: dict[str, Any] | None = None
    """Guided JSON: the schema the answer must satisfy (validity is checked after the run)."""


@dataclass(slots=True)
class RequestRecord:
    """One request as sent and answered; all times are seconds since the run's ``t0``."""

    index: int
    spec_index: int
    scheduled: float
    sent: float = 0.0
    end: float = 0.0
    status: int = 0
    """HTTP status; 0 when no response arrived (connection error, timeout)."""
    error: str | None = None
    """OpenAI ``error.code`` (or ``type``), ``connection_error``, ``timeout``, ``stream_error``; ``None`` = ok."""
    error_message: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    target_output_tokens: int | None = None
    finish_reason: str | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    text: str = ""
    client_output_tokens: int | None = None
    """The client's own estimate of the output tokens (events with text), shown beside ``usage``."""
    guided_valid: bool | None = None
    warmup: bool = False
    kind: str = "chat"
    conversation: int | None = None
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def schedule_lag_ms(self) -> float:
        return (self.sent - self.scheduled) * 1000.0

    @property
    def ttft_ms(self) -> float | None:
        """First generated token, from the scheduled send time."""
        return (self.chunk_times[0] - self.scheduled) * 1000.0 if self.chunk_times else None

    @property
    def ttft_from_send_ms(self) -> float | None:
        return (self.chunk_times[0] - self.sent) * 1000.0 if self.chunk_times else None

    @property
    def e2el_ms(self) -> float:
        return (self.end - self.scheduled) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first: (last - first chunk) / (output_tokens - 1)."""
        n = self.output_tokens
        if not self.chunk_times or n is None or n < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) * 1000.0 / (n - 1)

    def itl_ms(self) -> list[float]:
        """Inter-token latencies: each gap between events divided evenly over the tokens it carried."""
        out: list[float] = []
        times, toks = self.chunk_times, self.chunk_tokens
        for i in range(1, len(times)):
            k = toks[i] if i < len(toks) and toks[i] > 0 else 1
            gap = (times[i] - times[i - 1]) * 1000.0 / k
            out.extend([gap] * k)
        return out

    def to_row(self) -> dict[str, Any]:
        """The per-request JSONL row (times in ms since t0; ITL list included, raw text excluded)."""
        d = asdict(self)
        del d["text"], d["chunk_times"], d["chunk_tokens"]
        for k in ("scheduled", "sent", "end"):
            d[k + "_ms"] = round(d.pop(k) * 1000.0, 3)
        d["ttft_ms"] = _r(self.ttft_ms)
        d["tpot_ms"] = _r(self.tpot_ms)
        d["e2el_ms"] = _r(self.e2el_ms)
        d["schedule_lag_ms"] = _r(self.schedule_lag_ms)
        d["chunks"] = len(self.chunk_times)
        d["itl_ms"] = [round(x, 3) for x in self.itl_ms()]
        return d


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
