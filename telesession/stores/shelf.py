"""``ShelveStore``: sessions in one ``shelve`` database, for small bots on one host.

``shelve`` (``dbm``) is not safe for concurrent writers, and a process that keeps
a shelf open never sees another's writes.  So every operation opens the shelf,
works and closes it under a store-wide lock (a thread mutex plus a record lock
on byte 0 of ``PATH.lock``), and sessions are held per key as in every store
(record locks on other bytes of the same file).  Opening costs time in
proportion to the number of stored keys when Python has no ``gdbm`` (it then
falls back to ``dbm.dumb``, as on this project's reference machine): prefer
``SQLiteStore`` beyond a few thousand sessions.

``shelve`` pickles what it stores and loading a pickle runs code: never point a
``ShelveStore`` at a file that someone else can write.  The values kept here
are our own JSON records, pickled as ``bytes``.
"""
import ast
import dbm
import glob
import logging
import os
import shelve
import threading
from typing import Any, Iterator, Optional

from ..errors import CorruptSessionError, StoreError
from ..locking import range_lock_file_for
from .base import Store

__all__ = ["ShelveStore"]

logger = logging.getLogger("telesession")


class ShelveStore(Store):
    """Sessions in the ``shelve`` database at ``path`` (files ``path*``, all mode 0600)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {parent}: {exc.strerror}", None, self.path) from exc
        self.location = ("shelve", os.path.realpath(self.path))
        self._lock_path = self.path + ".lock"
        self._mutex = threading.Lock()
        with self._shelf("create", None):
            pass

    def describe(self, key: str) -> str:
        return f"record {key!r} of shelve database {self.path}"

    # -- records --------------------------------------------------------------------

    def load(self, key: str) -> Optional[bytes]:
        with self._shelf("read", key) as shelf:
            try:
                value = shelf.get(key)
            except Exception as exc:  # unpickling garbage raises anything
                raise CorruptSessionError(
                    f"session {key!r} is unreadable ({self.describe(key)}): {type(exc).__name__}: {exc}; "
                    "it was left untouched", key, self.describe(key)) from exc
        if value is not None and not isinstance(value, bytes):
            raise CorruptSessionError(f"session {key!r} ({self.describe(key)}) holds a "
                                      f"{type(value).__name__}, not a telesession record", key,
                                      self.describe(key))
        return value

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        with self._shelf("write", key) as shelf:
            shelf[key] = record

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        with self._shelf("delete", key) as shelf:
            try:
                del shelf[key]
            except KeyError:
                pass

    def keys(self) -> Iterator[str]:
        with self._shelf("list", None) as shelf:
            return iter(list(shelf.keys()))

    # -- locking --------------------------------------------------------------------

    def _lock_external(self, key: str, timeout: float) -> Any:
        lock_file = range_lock_file_for(self._lock_path)
        if not lock_file.acquire(key, timeout):
            raise self._timeout(key, timeout)
        return lock_file

    def _unlock_external(self, key: str, token: Any) -> None:
        token.release(key)

    # -- the shelf ------------------------------------------------------------------

    def _shelf(self, verb: str, key: Optional[str]) -> "_OpenShelf":
        return _OpenShelf(self, verb, key)

    def _open(self, verb: str, key: Optional[str]) -> shelve.Shelf:  # type: ignore[type-arg]
        try:
            db = dbm.open(self.path, "c", 0o600)
        except (SyntaxError, ValueError) as exc:  # dbm.dumb: a torn index from a crash mid-commit
            if self._restore_dumb_index():
                db = dbm.open(self.path, "c", 0o600)
            else:
                raise CorruptSessionError(
                    f"cannot {verb} session {key!r}: the shelve database {self.path} is damaged "
                    f"({type(exc).__name__}: {exc})", key, self.path) from exc
        except (OSError, dbm.error[0]) as exc:  # type: ignore[misc]
            raise StoreError(f"cannot {verb} session {key!r}: cannot open the shelve database "
                             f"{self.path}: {exc}", key, self.path) from exc
        for name in glob.glob(glob.escape(self.path) + "*"):
            if not name.endswith(".lock"):
                try:
                    if os.stat(name).st_mode & 0o077:
                        os.chmod(name, 0o600)
                except OSError:
                    pass
        return shelve.Shelf(db, protocol=4)  # type: ignore[arg-type]

    def _restore_dumb_index(self) -> bool:
        """Put back ``dbm.dumb``'s previous index when a crash tore the current one."""
        directory, backup = self.path + ".dir", self.path + ".bak"
        try:
            with open(backup, encoding="Latin-1") as f:
                text = f.read()
            for line in text.splitlines():
                ast.literal_eval(line)
        except (OSError, SyntaxError, ValueError):
            return False
        logger.warning("shelve index %s was damaged; restored it from %s", directory, backup)
        temp = directory + ".restore"
        with open(temp, "w", encoding="Latin-1") as f:
            f.write(text)
        os.replace(temp, directory)
        return True


    def __repr__(self) -> str:
        return f"ShelveStore({self.path!r})"


class _OpenShelf:
    """The shelf, open for one operation under the store-wide lock."""

    def __init__(self, store: ShelveStore, verb: str, key: Optional[str]) -> None:
        self.store, self.verb, self.key = store, verb, key
        self.shelf: Any = None

    def __enter__(self) -> Any:
        store = self.store
        store._mutex.acquire()
        try:
            lock_file = range_lock_file_for(store._lock_path)
            if not lock_file.acquire(None, 60.0):
                raise StoreError(f"cannot {self.verb} session {self.key!r}: the shelve database "
                                 f"{store.path} stayed locked for 60 s", self.key, store.path)
            try:
                self.shelf = store._open(self.verb, self.key)
            except BaseException:
                lock_file.release(None)
                raise
        except BaseException:
            store._mutex.release()
            raise
        return self.shelf

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.shelf.close()
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise exc
        except OSError as err:
            raise StoreError(f"cannot {self.verb} session {self.key!r} ({self.store.path}): {err}",
                             self.key, self.store.path) from err
        finally:
            range_lock_file_for(self.store._lock_path).release(None)
            self.store._mutex.release()
