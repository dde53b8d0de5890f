"""The ``Store`` protocol: what a backend implements, in one file, to hold sessions.

A store keeps opaque records (``bytes``, see ``telesession.records``) by string
key and provides a lock per key.  Serialization, change detection, expiry,
migrations and error wording live above the stores, in the manager, once.

A backend implements ``load``, ``save``, ``delete``, ``keys`` and ``describe``,
and names its ``location``; ``records`` (every record of a key prefix, for
``Sessions.items``) has a default built on ``keys`` and ``load`` that a store
with a cheaper bulk read overrides.  Locking comes from the base class: among threads
by ``telesession.locking.KeyLocks`` shared by every store object on the same
location; a backend that is shared between processes adds its own exclusion by
overriding ``_lock_external`` and ``_unlock_external`` (and, where the lock and the
record can travel in one round trip, ``load_locked`` and ``save_and_release``; a store
whose lock and read are cheap local steps may take both in ``acquire_and_load``).
"""
import abc
import time
from typing import Any, Hashable, Iterator, Optional, Tuple

from ..errors import LockTimeout, StoreError
from ..locking import (REENTERED, KeyLocks, ProcessLockFile, current_pid, key_locks_for, key_offset,
                       range_lock_file_for)

__all__ = ["Store"]


class Store(abc.ABC):
    """Where sessions live.  Subclasses must be safe to call from many threads at once."""

    #: Identity of the place the records live (a resolved path, a Redis address + prefix).
    #: Store objects with equal locations share one lock per key.
    location: Hashable

    #: Whether ``save`` and ``delete`` check ``previous`` and raise ``ConflictError``.
    conditional: bool = False

    #: Stores shared by processes on one host name a lock file: one byte of it per key
    #: (``telesession.locking.RangeLockFile``; ``PortableLockFile`` with ``filelock`` where
    #: ``fcntl`` is missing or ``TELESESSION_LOCKS=filelock``).  ``None``: this process only, or a backend
    #: that overrides ``_lock_external`` (Redis).
    lock_path: Optional[str] = None

    _locks: Optional[KeyLocks] = None
    _locks_pid: int = -1
    _lock_file: Optional[ProcessLockFile] = None
    _lock_file_pid: int = -1

    # -- what a backend implements -------------------------------------------------------

    @abc.abstractmethod
    def load(self, key: str) -> Optional[bytes]:
        """The record stored under ``key``, or ``None``."""

    @abc.abstractmethod
    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        """Store ``record`` atomically: a crash leaves the old record or the new one.

        ``previous`` is the record loaded under the current lock (``None``: there was
        none); a ``conditional`` store raises ``ConflictError`` when the stored record
        is no longer ``previous``.  ``ttl`` (seconds) lets a store with native expiry
        drop the record itself; expiry is enforced above the stores either way.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        """Remove ``key``; no error if it is absent."""

    @abc.abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every stored key that starts with ``prefix``, in no particular order, streamed."""

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        """``(key, record)`` of every stored key starting with ``prefix``, read without any lock.

        A record deleted between listing and reading is skipped.  The default reads key
        by key; stores with a bulk read (SQL, Redis) override it with a batched scan.
        """
        for key in self.keys(prefix):
            record = self.load(key)
            if record is not None:
                yield key, record

    @abc.abstractmethod
    def describe(self, key: str) -> str:
        """Where ``key``'s record lives, for error messages: a file, a row, a Redis key."""

    # -- locking ------------------------------------------------------------------------

    def _thread_locks(self) -> KeyLocks:
        pid = current_pid()
        if self._locks_pid != pid:  # first use, or a forked child: take this process's registry
            self._locks = key_locks_for(self.location)
            self._locks_pid = pid
        return self._locks  # type: ignore[return-value]

    def acquire(self, key: str, timeout: float) -> Any:
        """Take ``key`` exclusively (re-entrant per thread); ``LockTimeout`` after ``timeout``.

        Returns a token to pass to ``release``.
        """
        locks = self._locks
        if locks is None or self._locks_pid != current_pid():
            locks = self._thread_locks()
        start = time.monotonic()
        got = locks.acquire(key, timeout)
        if got == REENTERED:
            return None  # the outer holder owns the external lock
        if not got:
            raise self._timeout(key, timeout)
        try:
            return self._lock_external(key, max(timeout - (time.monotonic() - start), 0.0))
        except LockTimeout:
            locks.release(key)
            raise self._timeout(key, timeout) from None  # name the timeout asked for, not what was left
        except BaseException:
            locks.release(key)
            raise

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        """``load`` right after ``acquire`` returned ``token``: a store whose lock call already
        read the record (Redis) returns that copy instead of asking again."""
        return self.load(key)

    def acquire_and_load(self, key: str, timeout: float) -> Tuple[Any, Optional[bytes]]:
        """``acquire``, then ``load_locked``: how a handler's scope starts, in one call.  The
        lock is given back if the read fails."""
        token = self.acquire(key, timeout)
        try:
            return token, self.load_locked(key, token)
        except BaseException:
            self.release(key, token)
            raise

    def save_and_release(self, key: str, record: bytes, *, previous: Optional[bytes], ttl: Optional[float],
                         token: Any) -> None:
        """``save``, then ``release`` whatever happened: how a handler's scope ends.  A store
        that can write and unlock in one round trip (Redis) overrides it."""
        try:
            self.save(key, record, previous=previous, ttl=ttl)
        finally:
            self.release(key, token)

    def release(self, key: str, token: Any) -> None:
        """Give back a lock taken with ``acquire``."""
        locks = self._locks
        if locks is None or self._locks_pid != current_pid():
            locks = self._thread_locks()
        if token is None or token is True:  # re-entered, or no external lock
            locks.release(key)
            return
        try:
            self._unlock_external(key, token)
        finally:
            locks.release(key)

    def _lock_external(self, key: str, timeout: float) -> Any:
        """Exclude other processes/machines from ``key``; return a token (``True``: nothing to undo).

        The default locks ``key``'s byte of ``lock_path`` (nothing to do without one).
        """
        if self.lock_path is None:
            return True
        lock_file = self._process_lock_file(key)
        offset = key_offset(key)  # hashed once: release reuses it
        if not lock_file.lock_at(offset, timeout):
            raise self._timeout(key, timeout)
        return lock_file, offset

    def _unlock_external(self, key: str, token: Any) -> None:
        """Undo ``_lock_external``."""
        if token is not True:
            lock_file, offset = token
            lock_file.unlock_at(offset)

    def _process_lock_file(self, key: Optional[str] = None) -> ProcessLockFile:
        """This process's open ``lock_path``, looked up once per process, not per update."""
        if self._lock_file_pid != current_pid() or self._lock_file is None:
            try:
                self._lock_file = range_lock_file_for(self.lock_path)  # type: ignore[arg-type]
            except OSError as exc:
                raise StoreError(f"cannot lock session {key!r}: cannot open the lock file {self.lock_path}: "
                                 f"{exc.strerror or exc}", key, self.lock_path) from exc
            self._lock_file_pid = current_pid()
        return self._lock_file

    def _timeout(self, key: str, timeout: float) -> LockTimeout:
        return LockTimeout(
            f"could not lock session {key!r} within {timeout:g} s: another handler holds it "
            f"({self.describe(key)}); raise lock_timeout or make the handler faster",
            key, self.describe(key))

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Release connections and files; the store must not be used afterwards."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
