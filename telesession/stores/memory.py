"""``MemoryStore``: sessions in a dict of this process, for tests and throwaway bots."""
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from .. import locking
from ..locking import _DEPTH, _OWNER, _WAITERS, ACQUIRED, REENTERED, _get_ident, _wake
from .base import Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Records in a dict; lost when the process ends.

    It keeps serialized records, not live objects, so a handler can never change
    stored state after its lock is gone, and values behave exactly as in the
    persistent stores (what does not survive JSON fails here too).
    """

    def __init__(self) -> None:
        self._records: Dict[str, bytes] = {}
        self._mutex = threading.Lock()
        self.location = ("memory", id(self))

    def load(self, key: str) -> Optional[bytes]:
        return self._records.get(key)

    # The lock and I/O calls of an update, without the steps for an external lock that this
    # store never has.  The token of a lock taken afresh is its ``KeyLocks`` entry: giving it
    # back checks that entry is still the registered one, taken once, by this thread
    # (``None``: re-entered); anything else goes to ``KeyLocks.release``, which refuses it.

    def acquire(self, key: str, timeout: float) -> Any:
        locks = self._locks
        if locks is None or self._locks_pid != locking._pid:
            locks = self._thread_locks()
        mine = [_get_ident(), 1]  # KeyLocks.acquire's first step, inlined: the usual, free key
        if locks._entries.setdefault(key, mine) is mine:
            return mine
        got = locks.acquire(key, timeout)
        if got == ACQUIRED:
            return locks._entries[key]
        if got == REENTERED:
            return None
        raise self._timeout(key, timeout)

    def release(self, key: str, token: Any) -> None:
        locks = self._locks
        if locks is None or self._locks_pid != locking._pid:
            locks = self._thread_locks()
        if token is not None:  # KeyLocks.release inlined for a key taken once
            entries = locks._entries
            entry = entries.get(key)
            if (entry is token and entry is not None and entry[_DEPTH] == 1
                    and entry[_OWNER] == _get_ident()):
                entry[_OWNER] = None
                del entries[key]
                if len(entry) > _WAITERS:
                    _wake(entry)
                return
        locks.release(key)

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        return self._records.get(key)

    def acquire_and_load(self, key: str, timeout: float) -> Tuple[Any, Optional[bytes]]:
        locks = self._locks
        if locks is not None and self._locks_pid == locking._pid:  # acquire's first step, inlined
            mine = [_get_ident(), 1]
            if locks._entries.setdefault(key, mine) is mine:
                return mine, self._records.get(key)
        return self.acquire(key, timeout), self._records.get(key)  # (a dict lookup cannot fail)

    def save_and_release(self, key: str, record: bytes, *, previous: Optional[bytes], ttl: Optional[float],
                         token: Any) -> None:
        self._records[key] = record
        if token is not None:  # release() inlined (see there)
            locks = self._locks
            if locks is not None and self._locks_pid == locking._pid:
                entries = locks._entries
                entry = entries.get(key)
                if (entry is token and entry is not None and entry[_DEPTH] == 1
                        and entry[_OWNER] == _get_ident()):
                    entry[_OWNER] = None
                    del entries[key]
                    if len(entry) > _WAITERS:
                        _wake(entry)
                    return
        self.release(key, token)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        self._records[key] = record

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        self._records.pop(key, None)

    def keys(self, prefix: str = "") -> Iterator[str]:
        with self._mutex:
            return iter([k for k in list(self._records) if k.startswith(prefix)])

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        with self._mutex:
            return iter([(k, r) for k, r in list(self._records.items()) if k.startswith(prefix)])

    def describe(self, key: str) -> str:
        return f"memory store record {key!r}"

    def __repr__(self) -> str:
        return "MemoryStore()"
