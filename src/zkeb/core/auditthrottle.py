"""Aggregation of unauthenticated audit events: at most one event per subject and window, carrying a count.

Anyone can make the server refuse something (a forged device-token proof, say) as often as the rate limiter lets
them. Recording each refusal would let an anonymous caller grow an organization's hash chain without bound, so
such events pass through :func:`admit`: the first one of a subject (e.g. a project) in each window is recorded,
the rest are only counted, and the next recorded event reports how many the previous window saw. The chain stays
an ordinary chain (every recorded event is chained and verifiable); what it loses is one row per repeat.

Counters live in Redis (shared by every process; an atomic script) or, without `REDIS_URL` or while Redis fails,
in this process's memory: the bound then holds per process rather than per deployment, which still bounds it.
See docs/operations.md, "Refused device-token proofs in the audit log".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ("WINDOW_SECONDS", "Admission", "admit")

logger = logging.getLogger("zkeb.audit")

#: One recorded event per subject and window.
WINDOW_SECONDS = 60
_KEY_PREFIX = "zkeb:audit-agg:"
_MEMORY_SUBJECTS = 10_000

# KEYS[1] this window's counter, KEYS[2] the previous window's; ARGV[1] expiry (ms, two windows).
# Returns {count in this window including this one, count of the previous window (only when count == 1)}.
_COUNT_LUA = """
local count = redis.call('INCR', KEYS[1])
local previous = 0
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  previous = tonumber(redis.call('GET', KEYS[2]) or '0')
end
return {count, previous}
"""

_memory: dict[tuple[str, int], int] = {}


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether to record this occurrence, and how many occurrences the subject's previous window saw."""

    record: bool
    previous_window_count: int


def _count_in_memory(subject: str, window: int) -> tuple[int, int]:
    if len(_memory) >= _MEMORY_SUBJECTS:
        for stale in [key for key in _memory if key[1] < window - 1]:
            del _memory[stale]
        if len(_memory) >= _MEMORY_SUBJECTS:
            _memory.clear()
    count = _memory.get((subject, window), 0) + 1
    _memory[(subject, window)] = count
    return count, _memory.get((subject, window - 1), 0) if count == 1 else 0


async def admit(redis: Redis | None, subject: str) -> Admission:
    """Count one occurrence for `subject`; record it only if it is the first of the current window."""
    window = int(time.time() // WINDOW_SECONDS)
    if redis is not None:
        try:
            count, previous = (
                int(value)
                for value in await redis.eval(
                    _COUNT_LUA,
                    2,
                    f"{_KEY_PREFIX}{subject}:{window}",
                    f"{_KEY_PREFIX}{subject}:{window - 1}",
                    str(2 * WINDOW_SECONDS * 1000),
                )
            )
            return Admission(record=count == 1, previous_window_count=previous)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("audit aggregation counts in memory: Redis did not answer (%s)", type(exc).__name__)
    count, previous = _count_in_memory(subject, window)
    return Admission(record=count == 1, previous_window_count=previous)
