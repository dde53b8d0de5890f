"""Write stamps: whether any process wrote a key since this process last wrote it.

A store that keeps the records it wrote (``SQLiteStore``'s record cache) may hand one back
without reading only if no other writer touched the key since.  Every writer of the store
puts a new, never repeated stamp in the key's slot of one shared, memory-mapped file
*before* it writes (a delete also after); a process keeps the stamp it put next to the
record it wrote, and its copy is current exactly when the slot still holds that stamp.
Keys that share a slot (65,536 of them) only cost each other a read.

Layout of ``PATH`` (native byte order, 8-byte aligned words): word 0 counts the stamp
*series* handed out so far; word ``1 + i`` is slot ``i``.  A stamp is ``series << 36 |
n`` with ``n`` from 1 up: a series is taken under the store-wide lock (once per store
object, forked child and 2**36 writes), so no two writes ever carry the same stamp.
"""
import itertools
import mmap
import os
import threading
from typing import Callable, Iterator, List, Optional, Tuple

from .errors import StoreError
from .locking import current_pid

__all__ = ["WriteStamps", "SLOTS"]

#: Slots in the table: a key's slot is the low bits of its lock offset (``key_offset``).
SLOTS = 1 << 16
_MASK = SLOTS - 1
_SIZE = 8 * (1 + SLOTS)
_COUNT_BITS = 36
_SERIES_LIMIT = 1 << (64 - _COUNT_BITS)


#: Guards taking a series in this process; made afresh in a forked child (a thread of the
#: parent may have held it at the fork).
_series_mutex = threading.Lock()


def _after_fork_in_child() -> None:
    global _series_mutex
    _series_mutex = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class WriteStamps:
    """The stamp table of one store, mapped into this process (see the module docstring).

    ``take_store_lock`` runs a function holding the store-wide cross-process lock (the
    lock file's whole-store lock, which excludes the other threads of this process too);
    it guards the series counter in word 0.  It must not refer to the store (no cycle).
    """

    def __init__(self, path: str, take_store_lock: Callable[[Callable[[], None]], None]) -> None:
        self.path = path
        self._take_store_lock = take_store_lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0),
                     0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:  # new: sized once, by one process
                def grow() -> None:
                    if os.fstat(fd).st_size == 0:
                        os.ftruncate(fd, _SIZE)

                take_store_lock(grow)
                size = os.fstat(fd).st_size
            if size != _SIZE:
                raise ValueError(f"{path} is {size} bytes, not a stamp table of {_SIZE}")
            # Unmapped when this object goes: closing it while another thread writes would
            # fail that write with a ValueError instead of the store's own error.
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file
        #: The table as 8-byte words: ``words[1 + slot]``; reads and writes are single aligned stores.
        self.words = memoryview(self._map).cast("Q")
        # (stamps, last stamp, pid): the series in use, replaced in one assignment
        self._series: Tuple[Iterator[int], int, int] = (iter(()), 0, -1)
        self._renew(current_pid(), None)

    @staticmethod
    def slot(offset: int) -> int:
        """The word index of the slot of the key whose lock offset is ``offset``."""
        return 1 + (offset & _MASK)

    def next_stamp(self, pid: int) -> int:
        """A stamp no writer has used (``pid``: this process's): take it, put it in the key's
        slot, then write."""
        stamps, last, owner = self._series
        if owner != pid:  # a forked child must not repeat its parent's stamps
            self._renew(pid, None)
            stamps, last, owner = self._series
        stamp = next(stamps)  # atomic under the GIL: threads never get the same one
        if stamp > last:  # the series is used up (2**36 writes)
            self._renew(pid, last)
            stamp = next(self._series[0])
        return stamp

    def _renew(self, pid: int, used_up: Optional[int]) -> None:
        """Take the next series from word 0 under the store-wide lock, unless another
        thread of this process has just done so."""
        with _series_mutex:
            owner, last = self._series[2], self._series[1]
            if owner == pid and last != used_up:
                return
            taken: List[int] = []

            def take() -> None:
                series = self.words[0] + 1
                if series >= _SERIES_LIMIT:
                    raise StoreError(f"every stamp series of {self.path} is used up: delete the file "
                                     f"while no process has the store open", None, self.path)
                self.words[0] = series
                taken.append(series)

            self._take_store_lock(take)
            base = taken[0] << _COUNT_BITS
            self._series = (itertools.count(base + 1), base + (1 << _COUNT_BITS) - 1, pid)
