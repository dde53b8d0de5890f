"""Per-key locks: between the threads of a process, and between processes on one host.

``KeyLocks`` gives one owner per key among threads, re-entrant for the owning
thread, with entries only for keys held or awaited right now, so memory does not
grow with every chat ever seen.  ``RangeLockFile`` gives one owner per key among
processes with POSIX record locks on one byte of a single lock file per store,
opened once per process: no file is opened per update, and the kernel drops
the locks of a process that dies, so a killed bot never leaves a stale lock.
Where ``fcntl`` is missing (Windows), or when ``TELESESSION_LOCKS=filelock`` forces
it, ``range_lock_file_for`` returns a ``telesession.locking_portable.PortableLockFile``
instead (one ``filelock`` per key): processes are never left unlocked.
"""
import functools
import hashlib
import logging
import os
import threading
import time
from typing import Any, Dict, Hashable, List, Optional, Tuple, Union

from .locking_portable import PortableLockFile, take_mutex

__all__ = ["KeyLocks", "RangeLockFile", "ProcessLockFile", "key_locks_for", "range_lock_file_for", "held_keys",
           "current_pid", "key_offset", "lock_backend", "LOCKS_ENV"]

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


ACQUIRED, REENTERED = 1, 2

#: Environment variable choosing the cross-process lock backend: ``posix`` (``fcntl`` record
#: locks, the default where available) or ``filelock`` (portable, the default elsewhere).
LOCKS_ENV = "TELESESSION_LOCKS"

logger = logging.getLogger("telesession")

_get_ident = threading.get_ident


# A held key's entry: [owner, depth, *waiters].  A thread that finds the key held appends a
# lock of its own, already taken, and sleeps on it; the holder unregisters the entry, then
# releases every lock appended to it (``_wake``).  An uncontended key allocates no lock at
# all.  A list, not a class: it is made and dropped on every update, and a list costs a
# fraction of an object with an ``__init__``.
_OWNER, _DEPTH, _WAITERS = 0, 1, 2
_allocate_lock = threading.Lock


def _wake(entry: list) -> None:  # type: ignore[type-arg]
    """Wake the threads waiting for an entry its holder has just unregistered."""
    for waiter in entry[_WAITERS:]:
        waiter.release()


class KeyLocks:
    """Re-entrant per-key exclusion among the threads of one process.

    No mutex guards the registry: an uncontended key costs one ``dict.setdefault``
    to take and one ``del`` to give back (both atomic), so pool threads working on
    different chats never block each other -- under the GIL a blocked thread costs
    a thread switch, and on 2 cores that dominated the whole session layer.  A waiter
    appends its lock to the entry and then checks that the entry is still registered;
    the holder unregisters the entry and then reads its waiters.  So either the holder
    sees the waiter's lock and releases it, or the waiter sees the key free and tries
    again: a wake-up is never lost.
    """

    def __init__(self) -> None:
        self._entries: Dict[str, Any] = {}  # key -> [owner, depth, *waiters]

    def acquire(self, key: str, timeout: float) -> int:
        """Take ``key`` for this thread: ``ACQUIRED``, ``REENTERED`` (this thread held it already),
        or ``0`` if another thread kept it past ``timeout`` seconds."""
        me = _get_ident()
        entries = self._entries
        mine = [me, 1]
        entry = entries.setdefault(key, mine)
        if entry is mine:
            return ACQUIRED
        if entry[_OWNER] == me:
            entry[_DEPTH] += 1
            return REENTERED
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = min(deadline - time.monotonic(), threading.TIMEOUT_MAX)
            if not remaining > 0:
                return ACQUIRED if entries.setdefault(key, mine) is mine else 0  # one last try
            waiter = _allocate_lock()
            waiter.acquire()
            entry.append(waiter)
            still_held = entries.get(key) is entry  # then its holder will release our lock
            if still_held and not waiter.acquire(timeout=remaining):
                entry.remove(waiter)  # gave up: leave nothing in the holder's entry
                return ACQUIRED if entries.setdefault(key, mine) is mine else 0  # one last try
            entry = entries.setdefault(key, mine)
            if entry is mine:
                return ACQUIRED

    def release(self, key: str) -> None:
        """Give ``key`` back; its entry disappears, so the registry holds only held keys."""
        entry = self._entries.get(key)
        if entry is None or entry[_OWNER] != _get_ident():
            raise RuntimeError(f"key {key!r} is not held by this thread")
        entry[_DEPTH] -= 1
        if entry[_DEPTH]:
            return
        entry[_OWNER] = None
        del self._entries[key]
        if len(entry) > _WAITERS:
            _wake(entry)

    def holds(self, key: str) -> bool:
        """Whether the calling thread holds ``key``."""
        entry = self._entries.get(key)
        return entry is not None and entry[_OWNER] == _get_ident()

    def __len__(self) -> int:
        """Keys held right now (0 when idle: the registry does not grow)."""
        return len(self._entries)

    def held(self) -> List[str]:
        """The keys held right now, by any thread."""
        return [k for k, e in list(self._entries.items()) if e[_OWNER] is not None]


#: The byte of the writer lock (``RangeLockFile.lock_writer``): past every key's byte (at most 2**62).
WRITER_OFFSET = (1 << 62) + 1
#: The byte every process that opened the lock file holds a shared lock on: a process that
#: can turn its own into an exclusive lock is the only one (``RangeLockFile.alone``).
PRESENCE_OFFSET = WRITER_OFFSET + 1
#: How long a process trusts what it last found out about being alone before asking again.
ALONE_SECONDS = 0.05

#: How long a lock byte held by another process is retried without sleeping (yielding the
#: CPU between tries): a few queued writes, or a holder's turn on a busy core.  Sleeping at
#: once (the kernel's timer slack makes even 50 µs ~100 µs) or blocking in ``F_SETLKW``
#: cost more than the wait itself; 100 µs did as well with 2 processes on 2 cores, 300 µs
#: better with 4 (see docs/performance.md).
SPIN_SECONDS = 0.0003

_yield_cpu = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


@functools.lru_cache(maxsize=4096)  # recent chats: a hash per update is ~5 % of a SQLite update
def key_offset(key: str) -> int:
    """Byte offset of ``key``'s record lock: a 62-bit hash, so distinct keys practically never share one."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + (int.from_bytes(digest, "big") >> 2)  # offset 0 is the whole-store lock


class RangeLockFile:
    """Per-key exclusion among processes: a POSIX record lock on one byte per key of one lock file.

    Record locks belong to the process, so threads must first be serialized by
    ``KeyLocks``; and closing any descriptor of the file drops all of them, so the
    file is opened once per process and location and shared (``range_lock_file_for``).
    """

    def __init__(self, path: str) -> None:
        if fcntl is None:
            raise RuntimeError("POSIX record locks are not available here: use range_lock_file_for(), "
                               "which falls back to filelock")
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._writer = threading.Lock()  # this process's threads, in front of the writer byte
        self._store_mutex = threading.Lock()  # this process's threads, in front of the whole-store byte
        # What the writer mutex guards: whether its holder took the writer byte, and whether
        # this process was alone (asked again after ALONE_SECONDS).
        self._took_byte = False
        self._be_present()
        self._alone = self._check_alone()
        self._alone_until = time.monotonic() + ALONE_SECONDS

    def acquire(self, key: Optional[str], timeout: float) -> bool:
        """Take the lock of ``key`` (``None``: the whole-store lock); ``False`` after ``timeout`` seconds.

        A record lock belongs to the process, not the thread, so the threads of this process
        take turns on a mutex for the whole-store lock (keys have ``KeyLocks`` for that)."""
        if key is not None:
            return self.lock_at(key_offset(key), timeout)
        left = take_mutex(self._store_mutex, timeout)
        if left is None:
            return False
        try:
            if self.lock_at(0, left):
                return True
        except BaseException:
            self._store_mutex.release()
            raise
        self._store_mutex.release()
        return False

    def release(self, key: Optional[str]) -> None:
        if key is not None:
            self.unlock_at(key_offset(key))
            return
        try:
            self.unlock_at(0)
        finally:
            self._store_mutex.release()

    def lock_at(self, offset: int, timeout: float) -> bool:
        """Take the lock byte at ``offset`` (see ``key_offset``); ``False`` after ``timeout`` seconds.

        A key is usually held for one update (tens of µs): a waiter retries at once for
        ``SPIN_SECONDS``, then sleeps between tries, from 50 µs doubling to 10 ms."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            return True
        except (BlockingIOError, PermissionError):
            return self._wait(offset, timeout, 0.01)

    def unlock_at(self, offset: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    def lock_writer(self, timeout: float) -> bool:
        """Take the store's writer lock for one write statement; ``False`` after ``timeout`` seconds.

        The threads of this process take turns on a mutex, processes on one byte of the file
        (``WRITER_OFFSET``; not taken while the process is ``alone``), instead of colliding
        inside SQLite, whose busy handler sleeps 1, 2, 5, 10... ms between retries.  A
        process waiting for the byte retries at once for
        ``SPIN_SECONDS`` (blocking in ``F_SETLKW`` cost a sleep and a wake-up per write, and
        made two processes slower than one), then sleeps between tries up to 2 ms.  A holder
        that dies loses the byte with its other locks; one that is stopped makes the writers
        of other processes fail after ``timeout`` instead of waiting forever.
        """
        left = take_mutex(self._writer, timeout)
        if left is None:
            return False
        try:
            if self.alone():  # no other process to take turns with: the mutex is enough
                self._took_byte = False
                return True
            self._took_byte = True
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, WRITER_OFFSET)
                return True
            except (BlockingIOError, PermissionError):
                if self._wait(WRITER_OFFSET, left, 0.002):
                    return True
        except BaseException:  # interrupted: give back whatever was taken (unlocking a free byte is a no-op)
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, WRITER_OFFSET)
            finally:
                self._writer.release()
            raise
        self._writer.release()
        return False

    def unlock_writer(self) -> None:
        try:
            if self._took_byte:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, WRITER_OFFSET)
        finally:
            self._writer.release()

    def alone(self) -> bool:
        """Whether no other process has the lock file open, as found out at most
        ``ALONE_SECONDS`` ago (call it holding the writer mutex).

        Only a hint: a single process skips the writer byte (two system calls a write).  A
        process that arrives in between takes the byte, and until the next look the two
        may meet in SQLite's busy handler, which costs time, never correctness.
        """
        now = time.monotonic()
        if now >= self._alone_until:
            self._alone = self._check_alone()
            self._alone_until = now + ALONE_SECONDS
        return self._alone

    def _be_present(self) -> None:
        """Take this process's shared lock on ``PRESENCE_OFFSET``, so that others know of it.

        A process that is asking whether it is alone holds the byte exclusively for two
        system calls: retry for up to a second (a stopped process could hold it longer;
        then the next ``_check_alone`` makes us present)."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)
                return
            except (BlockingIOError, PermissionError):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.0001)

    def _check_alone(self) -> bool:
        """Ask the kernel: try to turn this process's shared lock on ``PRESENCE_OFFSET`` into
        an exclusive one (possible only if no other process holds one), then share again."""
        fd = self._fd
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)
        except (BlockingIOError, PermissionError):
            try:  # another process is present: be present too (a no-op when already shared)
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)
            except (BlockingIOError, PermissionError):
                pass  # it is asking the same question right now: we will be present next time
            return False
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)  # (a downgrade never waits)
        return True

    def _wait(self, offset: int, timeout: float, longest_sleep: float) -> bool:
        """Retry the byte at ``offset`` held by another process: at once, then sleeping."""
        fd = self._fd
        now = time.monotonic()
        deadline = now + timeout
        spin_until = now + min(SPIN_SECONDS, timeout)
        delay = 0.00005
        while True:
            now = time.monotonic()
            if now < spin_until:
                _yield_cpu()  # the holder may need this core to finish
            else:
                remaining = deadline - now
                if not remaining > 0:  # (NaN included)
                    return False
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, longest_sleep)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                return True
            except (BlockingIOError, PermissionError):
                pass


_registry_mutex = threading.Lock()
_pid = os.getpid()


def current_pid() -> int:
    """``os.getpid()`` without the system call: kept up to date across ``fork``."""
    return _pid
_key_locks: Dict[Hashable, KeyLocks] = {}

#: What a store locks keys of other processes with: one byte per key, or one filelock per key.
ProcessLockFile = Union[RangeLockFile, PortableLockFile]
_lock_files: Dict[Tuple[str, str], ProcessLockFile] = {}


def lock_backend() -> str:
    """``"posix"`` or ``"filelock"``: ``TELESESSION_LOCKS`` if set, else ``posix`` where ``fcntl`` exists."""
    wanted = os.environ.get(LOCKS_ENV, "").strip().lower()
    if wanted in ("", "auto"):
        return "posix" if fcntl is not None else "filelock"
    if wanted == "filelock":
        return wanted
    if wanted == "posix":
        if fcntl is None:
            raise RuntimeError(f"{LOCKS_ENV}=posix, but this system has no POSIX record locks (fcntl); "
                               f"unset it to use filelock")
        return wanted
    raise ValueError(f"{LOCKS_ENV}={wanted!r} is not a lock backend: use 'posix' or 'filelock'")


def key_locks_for(location: Hashable) -> KeyLocks:
    """The one ``KeyLocks`` of a store location in this process: managers over one store share it."""
    with _registry_mutex:
        locks = _key_locks.get(location)
        if locks is None:
            locks = _key_locks[location] = KeyLocks()
        return locks


def held_keys() -> List[str]:
    """Every key held right now in this process, over all store locations (for leak checks)."""
    with _registry_mutex:
        registries = list(_key_locks.values())
    return [key for locks in registries for key in locks.held()]


def range_lock_file_for(path: str) -> ProcessLockFile:
    """The one cross-process lock file of ``path`` in this process, of the backend ``lock_backend()`` names."""
    path = os.path.realpath(path)
    backend = lock_backend()
    with _registry_mutex:
        lock_file = _lock_files.get((backend, path))
        if lock_file is None:
            if backend == "posix":
                lock_file = RangeLockFile(path)
            else:
                lock_file = PortableLockFile(path, key_offset)
            logger.debug("cross-process locks of %s: %s", path, backend)
            _lock_files[(backend, path)] = lock_file
        return lock_file


def _after_fork_in_child() -> None:
    # A forked worker must not inherit the parent's thread-lock state (a key held by a
    # parent thread would stay held forever) nor share its lock-file descriptors.
    global _registry_mutex, _pid
    _registry_mutex = threading.Lock()
    _pid = os.getpid()
    _key_locks.clear()
    _lock_files.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
