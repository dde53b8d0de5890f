"""Per-key ordering: the updates of one key run one after another in the order they arrived.

telebot's worker pool may hand two updates of one chat to two workers that then
race for the session lock, so the later update can win.  With
``sessions.setup(bot, ordered=True)`` every update gets a ticket for its key when
it is dispatched (in ``update_id`` order within a batch); a worker waits until all
earlier tickets of that key are done.  Other keys never wait.  Every ticket is
finished when its task ends, whatever happened, and a wait longer than the
manager's ``lock_timeout`` gives up ordering (with a warning) instead of hanging.
"""
import logging
import threading
import time
from typing import Dict, Set, Tuple

__all__ = ["Sequencer", "Ticket"]

logger = logging.getLogger("telesession")

Ticket = Tuple[str, int]


class _Line:
    __slots__ = ("issued", "next", "done")

    def __init__(self) -> None:
        self.issued = 0
        self.next = 0
        self.done: Set[int] = set()


class Sequencer:
    """Issues per-key tickets and lets them run in order; memory only for keys with pending tickets."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._lines: Dict[str, _Line] = {}

    def issue(self, key: str) -> Ticket:
        with self._cond:
            line = self._lines.get(key)
            if line is None:
                line = self._lines[key] = _Line()
            seq = line.issued
            line.issued += 1
            return key, seq

    def wait_turn(self, ticket: Ticket, timeout: float) -> bool:
        """Block until every earlier ticket of the key is done; ``False`` if ``timeout`` ran out."""
        key, seq = ticket
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                line = self._lines.get(key)
                if line is None or line.next >= seq:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("session %r: update %d waited %.1f s for earlier updates of its key; "
                                   "running it out of order", key, seq, timeout)
                    return False
                self._cond.wait(remaining)

    def finish(self, ticket: Ticket) -> None:
        """Mark a ticket done (ran, failed, cancelled or skipped); later tickets may go."""
        key, seq = ticket
        with self._cond:
            line = self._lines.get(key)
            if line is None or seq < line.next:
                return
            line.done.add(seq)
            advanced = False
            while line.next in line.done:
                line.done.discard(line.next)
                line.next += 1
                advanced = True
            if line.next == line.issued:
                del self._lines[key]
            if advanced:
                self._cond.notify_all()

    def pending(self) -> int:
        """Keys with tickets not yet done (0 when idle)."""
        with self._cond:
            return len(self._lines)
