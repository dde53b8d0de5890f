"""``SQLiteStore``: every session a row of one SQLite database (WAL); production on one host.

Layout: one table ``sessions(key TEXT PRIMARY KEY, record BLOB NOT NULL, written REAL,
expires REAL)``, one row per key; ``expires`` is ``written + ttl`` when a ``ttl`` was
given (``NULL`` otherwise) and only serves ``purge_expired``.  Every load and save is a
primary-key lookup, so its cost does not grow with the number of rows.

Locking: threads are serialized per key by the base class; processes by a POSIX record
lock on one byte per key of ``PATH.lock`` (``telesession.locking.RangeLockFile``).  No
database-wide lock is held while a handler runs: SQLite is only locked for the few
microseconds of each write, and readers never wait for writers (WAL).

Record cache: a process keeps the records it wrote last (``cache_size`` of them) and, when
a handler takes the key again, hands its copy back without a ``SELECT`` if no writer has
touched the key since; ``PATH.stamps`` (``telesession.stamps``) tells, one memory-mapped
word per key slot that every writer of every process changes before it writes.
"""
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from .. import locking
from ..errors import ConflictError, CorruptSessionError, StoreError
from ..locking import _DEPTH, _OWNER, _WAITERS, _get_ident, _wake, current_pid, key_offset, range_lock_file_for
from ..stamps import SLOTS, WriteStamps
from .base import Store

__all__ = ["SQLiteStore"]

logger = logging.getLogger("telesession")

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_PAGE = 500  # keys read per query by keys(): no read transaction stays open between pages
_RECORD_PAGE = 1000  # rows read per query by records()
_SLOT_MASK = SLOTS - 1  # a key's stamp is word 1 + (key_offset(key) & _SLOT_MASK) (WriteStamps.slot)


def _prefix_end(prefix: str) -> Optional[str]:
    """The smallest string above every string starting with ``prefix`` (SQLite compares UTF-8
    bytes, which order as code points); ``None`` when there is none (no prefix, or all U+10FFFF)."""
    chars = prefix.rstrip("\U0010ffff")
    if not chars:
        return None
    last = ord(chars[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:  # surrogates cannot be stored: skip past them
        last = 0xE000
    return chars[:-1] + chr(last)

def _holding_store_lock(lock_path: str, timeout: float, action: Callable[[], None]) -> None:
    """Run ``action`` holding the store-wide lock of ``lock_path``: what guards the stamp
    table's series counter (a function of the paths, not of the store: no reference cycle)."""
    try:
        lock_file = range_lock_file_for(lock_path)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {lock_path}: {exc.strerror or exc}", None, lock_path) from exc
    if not lock_file.acquire(None, timeout):
        raise StoreError(f"another process or thread kept the store-wide lock of {lock_path} for {timeout:g} s "
                         f"(raise SQLiteStore(timeout=...) if that is legitimate)", None, lock_path)
    try:
        action()
    finally:
        lock_file.release(None)


_TABLE = ("CREATE TABLE IF NOT EXISTS sessions ("
          " key TEXT PRIMARY KEY NOT NULL,"
          " record BLOB NOT NULL,"
          " written REAL,"
          " expires REAL)")
_INDEX = "CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires) WHERE expires IS NOT NULL"

# Connections inherited through fork() belong to the parent: closing them in the child could
# disturb the parent's locks, so a child keeps them referenced (never used, never closed).
_inherited: List[sqlite3.Connection] = []


class _Connection:
    """One thread's connection; closed when the thread ends and its thread-local goes away."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = current_pid()

    def close(self) -> None:
        if self.pid == current_pid():
            try:
                self.conn.close()
            except sqlite3.Error:  # pragma: no cover - closing is best effort
                pass
        else:
            _inherited.append(self.conn)

    def __del__(self) -> None:
        self.close()


class SQLiteStore(Store):
    """Sessions in one SQLite database file, safe for many threads and processes on one host.

    ``path``: the database file, created owner-only (0600) with its parent directory if
    missing; ``PATH.lock`` holds the per-key process locks, and SQLite adds ``PATH-wal`` and
    ``PATH-shm`` with the database's mode.  ``synchronous`` is SQLite's durability setting:
    ``"NORMAL"`` (default) never corrupts the database and, in WAL mode, may lose the last
    writes on power loss (not on a process crash); ``"FULL"`` syncs every write (~7x slower
    here); ``"OFF"`` leaves syncing to the OS.  ``timeout`` (seconds) is how long a write
    waits for another write, of this process or another, before failing with ``StoreError``.
    ``wal_autocheckpoint`` is how many pages the WAL grows to before a commit copies them
    back into the database (SQLite's default is 1,000): 4,000 (~16 MB of WAL) writes each
    page back once for several commits on a table of 100,000 sessions, instead of once each.
    ``cache_size`` is how many records this store object keeps of the keys it wrote last: a
    handler that takes such a key again gets the copy without a read, unless a writer of
    any process touched the key since (``PATH.stamps`` tells; see the module docstring).
    0 keeps none.  Another program that writes the table directly, not through
    telesession, is noticed by the next save (``ConflictError``, nothing overwritten)
    instead of the next read: give such setups ``cache_size=0``.

    Each thread reads through its own connection; rows are written through one connection
    per process, used under the writer lock, whose page cache stays warm while only it
    commits.  A forked child opens its own instead of reusing the parent's.  Saves are
    conditional (``conditional = True``).
    """

    conditional = True

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, synchronous: str = "NORMAL",
                 timeout: float = 10.0, wal_autocheckpoint: int = 4000, cache_size: int = 10_000) -> None:
        sync = str(synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous={synchronous!r}: use one of {', '.join(_SYNCHRONOUS)}")
        self.synchronous = sync
        self.timeout = float(timeout)
        if not 0 <= self.timeout < float("inf"):
            raise ValueError(f"timeout={timeout!r}: use a number of seconds, 0 or more")
        if type(wal_autocheckpoint) is not int or wal_autocheckpoint < 1:
            raise ValueError(f"wal_autocheckpoint={wal_autocheckpoint!r}: use a number of pages, 1 or more")
        self.wal_autocheckpoint = wal_autocheckpoint
        if type(cache_size) is not int or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r}: use a number of records, 0 or more")
        self.cache_size = cache_size
        path = os.path.abspath(os.fspath(path))
        self._create_file(path)
        self.path = os.path.realpath(path)
        self.location = ("sqlite", self.path)
        self._local = threading.local()
        self._writer: Optional[_Connection] = None  # see _writer_conn
        self._all: "weakref.WeakSet[_Connection]" = weakref.WeakSet()
        self._mutex = threading.Lock()
        self._closed = False
        self.lock_path = self.path + ".lock"
        self._initialize()
        # Every process stamps its writes, whatever its own cache_size: others may cache.
        try:
            self._stamps = WriteStamps(self.path + ".stamps",
                                       partial(_holding_store_lock, self.lock_path, self.timeout))
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot open the write stamps of the SQLite database {self.path}: {exc}",
                             None, self.path + ".stamps") from exc
        self._owner_only(self._stamps.path)
        self._words = self._stamps.words
        # key -> (stamp, record) of this process's last writes, oldest first; None: no cache
        self._cache: "Optional[OrderedDict[str, Tuple[int, bytes]]]" = OrderedDict() if cache_size else None

    # -- files and connections ----------------------------------------------------------

    @staticmethod
    def _create_file(path: str) -> None:
        """Create the database file owner-only before SQLite sees it (umask-independent)."""
        parent = os.path.dirname(path)
        try:
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StoreError(f"cannot create the SQLite database {path}: {exc}", None, path) from exc
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _initialize(self) -> None:
        """Switch the database to WAL and create the table, one process at a time.

        Processes starting together on a new file would otherwise race for the exclusive
        lock that switching to WAL needs, and SQLite answers that race "database is
        locked" at once, without waiting.
        """
        lock_file = self._process_lock_file(None)
        if not lock_file.acquire(None, self.timeout):
            raise StoreError(f"cannot open the SQLite database {self.path}: another process kept "
                             f"{self.lock_path} locked for {self.timeout:g} s", None, self.path)
        try:
            self._create_schema()
        finally:
            lock_file.release(None)

    def _create_schema(self) -> None:
        conn = self._conn(None)
        where = self.path
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("SQLite database %s stays in journal_mode=%s (WAL unavailable here): "
                               "readers and writers will wait for each other", where, mode)
            conn.execute(_TABLE)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            missing = {"key", "record", "written", "expires"} - columns
            if missing:
                raise StoreError(
                    f"{where} has a table 'sessions' that is not telesession's (no column "
                    f"{', '.join(sorted(missing))}); use another database file", None, where)
            conn.execute(_INDEX)
        except sqlite3.Error as exc:
            raise self._error(exc, None, where, "opening") from exc
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; make sure
            self._owner_only(self.path + suffix)

    @staticmethod
    def _owner_only(path: str) -> None:
        try:
            st = os.stat(path)
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(path, 0o600)
        except OSError:
            pass

    def _conn(self, key: Optional[str]) -> sqlite3.Connection:
        """This thread's connection in this process, opened on first use."""
        holder = getattr(self._local, "conn", None)
        if holder is not None and holder.pid == current_pid():
            return holder.conn
        holder = self._open(key)
        self._local.conn = holder  # replaces (and, in a forked child, abandons) an inherited one
        return holder.conn

    def _writer_conn(self, key: str) -> sqlite3.Connection:
        """The connection this process writes rows through, used only under the writer lock.

        One for all threads: a connection drops its whole page cache whenever another one
        has committed, so per-thread connections would read the table's pages again for
        nearly every write of a busy bot; this one keeps them while only it commits.
        """
        holder = self._writer
        if holder is not None and holder.pid == current_pid():
            return holder.conn
        holder = self._writer = self._open(key)  # (in a forked child: abandons the parent's)
        return holder.conn

    def _open(self, key: Optional[str]) -> _Connection:
        """A new connection of this process, set up and registered for ``close``."""
        if self._closed:
            raise StoreError(f"SQLiteStore({self.path!r}) is closed", key, self.path)
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, key, self.path, "opening") from exc
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.wal_autocheckpoint}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, key, self.path, "opening") from exc
        holder = _Connection(conn)
        with self._mutex:
            self._all.add(holder)
        return holder

    def _error(self, exc: BaseException, key: Optional[str], where: str, doing: str) -> StoreError:
        text = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and (
                "not a database" in text or "malformed" in text or "encrypted" in text):
            context = "" if where == self.path else f" (while {doing} {where})"
            return CorruptSessionError(
                f"{self.path} is not a usable SQLite database: {text}{context}; it was left "
                f"untouched: move it away or point SQLiteStore at another path", key, where)
        hint = ""
        if "locked" in text or "busy" in text:
            hint = (f" (a writer waits at most {self.timeout:g} s for another: raise SQLiteStore(timeout=...)"
                    f" if that is too short)")
        return StoreError(f"SQLite failed while {doing} {where}: {type(exc).__name__}: {text}{hint}",
                          key, where)

    # -- the Store protocol -------------------------------------------------------------

    def describe(self, key: str) -> str:
        return f"row {key!r} of {self.path}"

    def load(self, key: str) -> Optional[bytes]:
        holder = getattr(self._local, "conn", None)
        conn = holder.conn if holder is not None and holder.pid == locking._pid else self._conn(key)
        try:
            row = conn.execute("SELECT record FROM sessions WHERE key=?", (key,)).fetchone()
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            raise self._error(exc, key, self.describe(key), "reading") from exc
        return None if row is None else bytes(row[0])

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        """``load``, or this process's copy of the record it wrote last if the key's stamp
        shows that nobody wrote it since (the caller holds the key)."""
        cache = self._cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                offset = token[1] if type(token) is tuple else key_offset(key)
                if self._words[1 + (offset & _SLOT_MASK)] == hit[0]:
                    return hit[1]
        return self.load(key)

    def _stamp(self, key: str, stamp: Optional[int] = None) -> int:
        """Put a new stamp (or ``stamp``, taken earlier with ``next_stamp``) in ``key``'s slot
        and forget this process's copy: call before writing it."""
        if stamp is None:
            stamp = self._stamps.next_stamp(locking._pid)
        self._words[1 + (key_offset(key) & _SLOT_MASK)] = stamp
        cache = self._cache
        if cache is not None:
            cache.pop(key, None)
        return stamp

    def _remember(self, key: str, stamp: int, record: bytes) -> None:
        """Keep ``record``, just written under ``stamp``, dropping the oldest copy past ``cache_size``."""
        cache = self._cache
        if cache is not None:
            cache[key] = (stamp, record)
            if len(cache) > self.cache_size:
                try:
                    cache.popitem(last=False)
                except KeyError:  # (emptied by another thread)
                    pass

    # The lock calls of an update, without the generic steps of the base class (same locks,
    # same order: this thread's key lock, then this key's byte of the lock file).

    def acquire(self, key: str, timeout: float) -> Any:
        locks = self._locks
        lock_file = self._lock_file
        if (locks is None or self._locks_pid != locking._pid or lock_file is None
                or self._lock_file_pid != locking._pid or key in locks._entries):
            return super().acquire(key, timeout)  # first use, a forked child, or a key held here
        mine = [_get_ident(), 1]
        entries = locks._entries
        if entries.setdefault(key, mine) is not mine:
            return super().acquire(key, timeout)  # another thread took it just now: wait as usual
        offset = key_offset(key)
        try:
            if lock_file.lock_at(offset, timeout):
                return lock_file, offset
        except BaseException:
            locks.release(key)
            raise
        locks.release(key)
        raise self._timeout(key, timeout)

    def release(self, key: str, token: Any) -> None:
        locks = self._locks
        if type(token) is tuple and locks is not None and self._locks_pid == locking._pid:
            entries = locks._entries
            entry = entries.get(key)
            if entry is not None and entry[_OWNER] == _get_ident() and entry[_DEPTH] == 1:
                try:
                    token[0].unlock_at(token[1])
                finally:
                    entry[_OWNER] = None
                    del entries[key]
                    if len(entry) > _WAITERS:
                        _wake(entry)
                return
        super().release(key, token)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        """Write ``record`` only if the row is still ``previous`` (absent for ``None``)."""
        written = time.time()
        expires = None if ttl is None else written + ttl
        lock_file = self._lock_file
        if lock_file is None or self._lock_file_pid != current_pid():
            lock_file = self._process_lock_file(key)
        # The stamp goes before the write, and before the writer lock: what every writer
        # waits for is then only the statement itself (and a new series, which takes the
        # whole-store lock, is never taken while holding the writer lock).
        stamp = self._stamp(key)
        # One writer at a time (RangeLockFile.lock_writer): threads and processes take turns
        # there, instead of colliding in SQLite, whose busy handler sleeps 1, 2, 5... ms.
        if not lock_file.lock_writer(self.timeout):
            raise StoreError(
                f"cannot write {self.describe(key)}: the writer lock of {lock_file.path} stayed "
                f"taken for {self.timeout:g} s (a process stopped or hung while writing?); nothing "
                f"was written (raise SQLiteStore(timeout=...) if writes legitimately take that long)",
                key, self.describe(key))
        try:
            try:
                cur = self._write(self._writer_conn(key), key, record, written, expires, previous)
            finally:
                lock_file.unlock_writer()
            changed = cur.rowcount
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            raise self._error(exc, key, self.describe(key), "writing") from exc
        if changed != 1:
            what = "was created" if previous is None else "was changed or deleted"
            raise ConflictError(
                f"session {key!r} {what} by another writer since it was loaded "
                f"({self.describe(key)}); nothing was overwritten", key, self.describe(key))
        self._remember(key, stamp, record)

    @staticmethod
    def _write(conn: sqlite3.Connection, key: str, record: bytes, written: float,
               expires: Optional[float], previous: Optional[bytes]) -> sqlite3.Cursor:
        if previous is None:
            return conn.execute(
                "INSERT INTO sessions(key, record, written, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO NOTHING", (key, record, written, expires))
        return conn.execute(
            "UPDATE sessions SET record=?, written=?, expires=? WHERE key=? AND record=?",
            (record, written, expires, key, previous))

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        """Remove the row; with ``previous``, only if it is still that record.

        ``previous=None`` deletes whatever is stored (what ``telesession rm`` wants); a row
        that is already gone is not an error.
        """
        conn = self._conn(key)
        self._stamp(key)
        # Stamped after as well: a delete made without the key's lock (rm from a program) may
        # land after a save that began later, whose copy must not outlive the row.  That
        # stamp is taken now, so that putting it after the delete cannot fail.
        after = self._stamps.next_stamp(locking._pid)
        try:
            if previous is None:
                conn.execute("DELETE FROM sessions WHERE key=?", (key,))
                return
            cur = conn.execute("DELETE FROM sessions WHERE key=? AND record=?", (key, previous))
            if cur.rowcount == 1:
                return
            row = conn.execute("SELECT 1 FROM sessions WHERE key=?", (key,)).fetchone()
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            raise self._error(exc, key, self.describe(key), "deleting") from exc
        finally:
            self._stamp(key, after)
        if row is not None:
            raise ConflictError(
                f"session {key!r} was changed by another writer since it was loaded "
                f"({self.describe(key)}); it was not deleted", key, self.describe(key))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, read in pages of 500 so no read transaction stays open
        while you iterate."""
        for rows in self._pages("key", prefix, _PAGE):
            for (key,) in rows:
                yield key

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        """``(key, record)`` of the keys starting with ``prefix``: a key-range scan of the primary
        key in pages of 1,000 rows (no lock, no read transaction held between pages)."""
        for rows in self._pages("key, record", prefix, _RECORD_PAGE):
            for key, record in rows:
                yield key, bytes(record)

    def _pages(self, columns: str, prefix: str, size: int) -> Iterator[List[Any]]:
        """Pages of ``SELECT columns`` over the key range of ``prefix``, in key order."""
        upper = _prefix_end(prefix)
        where, args = "key >= ?", [prefix]
        if upper is not None:
            where += " AND key < ?"
            args.append(upper)
        first = f"SELECT {columns} FROM sessions WHERE {where} ORDER BY key LIMIT ?"
        after = f"SELECT {columns} FROM sessions WHERE key > ? AND {where} ORDER BY key LIMIT ?"
        last: Optional[str] = None
        while True:
            conn = self._conn(None)
            try:
                if last is None:
                    rows = conn.execute(first, (*args, size)).fetchall()
                else:
                    rows = conn.execute(after, (last, *args, size)).fetchall()
            except (sqlite3.Error, UnicodeEncodeError) as exc:
                raise self._error(exc, None, self.path, "listing") from exc
            if upper is None and prefix and rows and not rows[-1][0].startswith(prefix):
                # A prefix of only U+10FFFF has no range end: keys are in order, stop at the first miss.
                yield [r for r in rows if r[0].startswith(prefix)]
                return
            if rows:
                yield rows
            if len(rows) < size:
                return
            last = rows[-1][0]

    def purge_expired(self, now: Optional[float] = None) -> int:
        """Delete the rows whose ``ttl`` has run out; returns how many.

        A key some handler holds right now is skipped (it is in use, so about to be rewritten).
        """
        now = time.time() if now is None else now
        conn = self._conn(None)
        try:
            expired = [k for (k,) in conn.execute(
                "SELECT key FROM sessions WHERE expires IS NOT NULL AND expires < ?", (now,))]
        except sqlite3.Error as exc:
            raise self._error(exc, None, self.path, "purging") from exc
        purged = 0
        for key in expired:
            try:
                token = self.acquire(key, 0)
            except (StoreError, TimeoutError):
                continue
            try:
                self._stamp(key)
                cur = conn.execute("DELETE FROM sessions WHERE key=? AND expires IS NOT NULL AND expires < ?",
                                   (key, now))
                purged += cur.rowcount
            except sqlite3.Error as exc:
                raise self._error(exc, key, self.describe(key), "purging") from exc
            finally:
                self.release(key, token)
        if purged:
            logger.debug("purged %d expired sessions from %s", purged, self.path)
        return purged

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection this process opened; the store must not be used afterwards."""
        self._closed = True
        self._cache = None
        with self._mutex:
            holders = list(self._all)
            self._all = weakref.WeakSet()
        for holder in holders:
            holder.close()
        self._local = threading.local()
        self._writer = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"
