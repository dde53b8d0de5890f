"""Portable per-key exclusion among processes with ``filelock``: where POSIX record locks are missing.

``telesession.locking.RangeLockFile`` locks one byte per key of a single file with
``fcntl.lockf``, which Windows lacks.  ``PortableLockFile`` offers the same calls
with one ``filelock.FileLock`` per key (``msvcrt`` on Windows, ``flock`` elsewhere)
on a file of the directory ``PATH.d`` beside the store's lock file, named after
the key's 62-bit hash; the store-wide lock is ``PATH.d/store.lock``.  Each acquire
opens that file and each release closes it (about 0.2 ms), and the operating
system drops the lock of a process that dies, as with record locks.

``telesession.locking.range_lock_file_for`` picks this backend when ``fcntl`` is
missing, or everywhere when the environment says ``TELESESSION_LOCKS=filelock``.
Every process sharing a store must use the same backend: a record lock and a
``filelock`` on different files do not exclude each other.
"""
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional

__all__ = ["PortableLockFile", "take_mutex"]


def take_mutex(mutex: "threading.Lock", timeout: float) -> Optional[float]:
    """Acquire ``mutex`` within ``timeout`` seconds: the seconds left of ``timeout``, or ``None``."""
    if mutex.acquire(False):
        return timeout
    start = time.monotonic()
    if not (timeout > 0 and mutex.acquire(timeout=min(timeout, threading.TIMEOUT_MAX))):
        return None
    return timeout - (time.monotonic() - start)


class PortableLockFile:
    """Per-key exclusion among processes: one ``filelock.FileLock`` per key, held only while locked.

    Threads are serialized per key by ``KeyLocks`` before they get here, so the
    locks are not thread-local and a dict holds only the keys locked right now.
    """

    def __init__(self, path: str, key_offset: Callable[[str], int]) -> None:
        import filelock  # required (>=3.12: thread_local=False), imported only when this backend is used

        self._filelock = filelock
        self.path = path
        self.directory = path + ".d"
        self._key_offset = key_offset
        self._held: Dict[int, Any] = {}
        self._mutex = threading.Lock()
        self._writer = threading.Lock()
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _instances.add(self)

    def file_of(self, offset: int) -> str:
        """The lock file of ``offset`` (``0``: the whole-store lock)."""
        name = "store.lock" if offset == 0 else "{:016x}.lock".format(offset)
        return os.path.join(self.directory, name)

    def acquire(self, key: Optional[str], timeout: float) -> bool:
        """Take the lock of ``key`` (``None``: the whole-store lock); ``False`` after ``timeout`` seconds."""
        return self.lock_at(0 if key is None else self._key_offset(key), timeout)

    def release(self, key: Optional[str]) -> None:
        self.unlock_at(0 if key is None else self._key_offset(key))

    def lock_at(self, offset: int, timeout: float) -> bool:
        """Take the lock of ``offset`` (see ``key_offset``); ``False`` after ``timeout`` seconds."""
        lock = self._filelock.FileLock(self.file_of(offset), thread_local=False, mode=0o600)
        try:
            lock.acquire(timeout=max(timeout, 0.0), poll_interval=0.002)
        except self._filelock.Timeout:
            return False
        with self._mutex:
            self._held[offset] = lock
        return True

    def lock_writer(self, timeout: float) -> bool:
        """The threads of this process take turns on a mutex; ``False`` after ``timeout`` seconds.

        No lock among processes on this backend: their writes meet in SQLite's busy handler."""
        return take_mutex(self._writer, timeout) is not None

    def unlock_writer(self) -> None:
        self._writer.release()

    def unlock_at(self, offset: int) -> None:
        with self._mutex:
            lock = self._held.pop(offset, None)
        if lock is None:
            raise RuntimeError("lock {} of {} is not held by this process".format(offset, self.path))
        lock.release(force=True)


#: Every ``PortableLockFile`` of this process, so a forked child can disown its parent's locks.
_instances: "weakref.WeakSet[PortableLockFile]" = weakref.WeakSet()
#: Locks a forked child inherited: kept referenced so their ``__del__`` never unlocks them.
_inherited: List[Any] = []


def _disown(lock: Any) -> None:
    """Close a child's copy of an inherited lock's file without unlocking it for the parent."""
    context = getattr(lock, "_context", lock)  # filelock keeps its state on ``_context`` (3.12+)
    fd = getattr(context, "lock_file_fd", None)
    if fd is not None:
        context.lock_file_fd = None  # release() is then a no-op: the parent's flock stays
        if hasattr(context, "lock_counter"):
            context.lock_counter = 0
        try:
            os.close(fd)  # the open file description, and its flock, live on in the parent
        except OSError:
            pass
    _inherited.append(lock)


def _after_fork_in_child() -> None:
    """A forked child owns none of its parent's locks: forget them without releasing them.

    (An older filelock's ``FileLock.__del__`` would ``flock(LOCK_UN)`` the shared file
    description when the child dropped it, freeing the key under the parent's handler.)
    """
    for lock_file in list(_instances):
        held, lock_file._held = lock_file._held, {}
        lock_file._mutex = threading.Lock()
        for lock in held.values():
            _disown(lock)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
