"""What a disk sync tells garbage collection: the round its chunk references are safe from.

Garbage collection (hamal_workers/gc.py, docs/GC.md) condemns unreferenced chunks in
numbered rounds, by renaming them out of reach of has_chunk and put_chunk, and only
then publishes the round's number. A sync that decides to reference a chunk (found
stored, or stored by put_chunk) after it saw round N published cannot have chosen a
chunk of round N or older: those were out of reach already. A decision made under an
older round may name a chunk condemned since, and until the entry is in the checkpoint,
where the collector reads it, the collector must not drop that round's chunks.

So every decision is counted in flight under the round this sync last saw, from before
has_chunk until the collector thread holds its result; and each checkpoint carries the
`ack`: the lowest round of a decision still in flight, or the newest round seen. Once
every running disk's checkpoint acknowledges round N, every reference made under an
older round is in a checkpoint, a staged manifest or a committed point, and the
collector may drop round N's chunks that none of those name.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable


class ReuseFence:
    def __init__(self, published_round: Callable[[], int]) -> None:
        self._published_round = published_round
        self._lock = threading.Lock()
        self._seen = published_round()
        self._in_flight: Counter[int] = Counter()

    def enter(self) -> int:
        """Before a decision to reference a chunk: the round it is made under."""
        with self._lock:
            self._in_flight[self._seen] += 1
            return self._seen

    def leave(self, gc_round: int) -> None:
        """Once the decision's entry is in the collector's hands (to be checkpointed)."""
        with self._lock:
            self._in_flight[gc_round] -= 1
            if self._in_flight[gc_round] <= 0:
                del self._in_flight[gc_round]

    def ack(self) -> int:
        """The round the next checkpoint acknowledges; call it in the collector thread.

        Every decision made under an older round has been handed to the collector by the
        time this returns, so the entries it collected so far cover them.
        """
        fresh = self._published_round()
        with self._lock:
            # Never backwards: a flushed Redis reads 0 until the collector runs again.
            self._seen = max(self._seen, fresh)
            return min([self._seen, *self._in_flight])


class NoFence(ReuseFence):
    """For engine callers without garbage collection (benchmarks, unit tests)."""

    def __init__(self) -> None:
        super().__init__(lambda: 0)
